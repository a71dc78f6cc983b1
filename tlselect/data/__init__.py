"""The data step of the DAG: fetch the image folder, choose a reproducible subset, decode it once into
uint8 tensors."""
