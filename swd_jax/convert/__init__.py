"""Weight conversion between diffusers/transformers/PEFT checkpoints and our Flax parameter pytrees."""
