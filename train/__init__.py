"""Training entry points (`twig-jax train` calls train.train.main)."""
