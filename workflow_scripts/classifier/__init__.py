"""One classifier run (train_classifier): the timm model, the decoded-image cache, the device settings."""
