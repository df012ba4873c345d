"""CrystalCoder configuration for transformers, in LLM360's field names.

Field names and meanings follow LLM360's released config.json (LLM360/crystalcoder-train,
finetune/Megatron-LM/CrystalCoder/config.json): GPT-2 style names (n_embd, n_layer, n_head, n_inner,
n_positions, layer_norm_epsilon), `activation_function: swiglu`, `position_embedding_type: rotary` with
`rotary_dim` rotated dims per head (GPT-J interleaved pairs), and the muP fields `mup_width_scale`,
`mup_embeddings_scale`, `mup_output_alpha`, `mup_scale_qk_dot_by_d` (attention scores / head_dim instead of
/ sqrt(head_dim), when `scale_attn_weights` is on). `rope_theta` is an addition of this file: LLM360's
code hard-codes 10000, which is also the default here.
"""

from transformers import PretrainedConfig


class CrystalCoderConfig(PretrainedConfig):
    model_type = "crystalcoder"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size=32032,
        n_positions=2048,
        n_embd=4096,
        n_layer=32,
        n_head=32,
        n_inner=None,
        activation_function="swiglu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        scale_attn_weights=True,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        position_embedding_type="rotary",
        rotary_dim=None,
        rope_theta=10000.0,
        mup_width_scale=1.0,
        mup_embeddings_scale=1.0,
        mup_output_alpha=1.0,
        mup_scale_qk_dot_by_d=False,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.position_embedding_type = position_embedding_type
        self.rotary_dim = rotary_dim
        self.rope_theta = rope_theta
        self.mup_width_scale = mup_width_scale
        self.mup_embeddings_scale = mup_embeddings_scale
        self.mup_output_alpha = mup_output_alpha
        self.mup_scale_qk_dot_by_d = mup_scale_qk_dot_by_d
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs
        )
