"""The pretrained models: SD 1.5 loading and where model.pretrained points (model_location, torch-free),
the tiny offline look-alike, the demo's pretrained base, and the weights inventory (weights)."""
