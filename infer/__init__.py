"""Inference entry points over the library (`python -m infer.demo`, ...); the assets the demo and
the bundled-model tests read live in infer/assets."""
