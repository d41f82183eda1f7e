"""LLaVA-1.5 in Flax NNX: CLIP vision tower, projector, LLaMA decoder with stacked layers."""
