"""LoRA training (train_lora): the model and its loss, resumable checkpoints and latent cache, validation."""
