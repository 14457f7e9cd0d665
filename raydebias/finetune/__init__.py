"""Fine-tuning of the diffusion model: DreamBooth-style LoRA adapters (one per group or cluster)."""
