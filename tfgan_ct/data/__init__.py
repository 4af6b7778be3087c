"""Data: DICOM and image reading, masking, resizing, splits, shards, conversion, the input pipeline."""
