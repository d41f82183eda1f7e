"""twig-jax: LLaVA-1.5 and TwigVLM (twig-guided pruning + self-speculative decoding) in JAX/Flax NNX."""

__version__ = "0.1.0"
