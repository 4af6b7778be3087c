"""Using trained models: SavedModel export, inference, DICOM upscaling, TensorFlow Serving files."""
