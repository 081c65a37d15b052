"""Decoder core: block-sparse attention, Mixture-of-Experts, decoder, generation, LoRA.  torch only."""
from core.attention import AttentionConfig, BlockSparseAttention, block_sparse_attention
from core.decoder import Decoder, DecoderConfig, DecoderOutput
from core.generate import GenerationConfig, generate
from core.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora, trainable_fraction
from core.moe import MoE, MoEConfig

__all__ = ["AttentionConfig", "BlockSparseAttention", "block_sparse_attention", "Decoder", "DecoderConfig",
           "DecoderOutput", "GenerationConfig", "generate", "LoRAConfig", "apply_lora", "load_lora_state_dict",
           "lora_state_dict", "merge_lora", "trainable_fraction", "MoE", "MoEConfig"]
