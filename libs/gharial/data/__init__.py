"""Training and validation data: manifests and other formats, augmentation, synthetic speech."""
