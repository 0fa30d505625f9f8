"""Synthetic X-rays: plan_generation, generate_xrays and merge_generation over the shared work in
pipeline, each image folder's provenance, and the noise control's images (noise_images)."""
