"""The VLA model and its processor. Importing this package imports torch; the processor and image
transform (edge_vla.model.processor / .image) do not."""
