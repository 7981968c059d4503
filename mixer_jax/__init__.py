"""mixer_jax: MLP-Mixer in JAX/Flax."""
