"""Networks and losses: the ESRGAN generator, the VGG-style discriminator, VGG19 features, the GAN."""
