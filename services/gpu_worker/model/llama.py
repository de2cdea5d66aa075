"""The Llama-family decoder over one flattened token batch with a paged KV cache.

Every linear layer runs once over all T tokens of the step (q/k/v fused, gate/up fused), followed by one call of
the LoRA backend over the adapters' token ranges. Attention is per sequence group: single-token decodes are
batched over a padded gather of their cached context; prefill chunks attend to their cached context plus themselves.
The residual stream is carried as (residual, delta): each sublayer's output is added to the residual where the next
RMSNorm reads it, which on the Triton path (attention_backend "triton") is one fused kernel (model/fused_layer_ops.py,
with RoPE + the KV cache write and SiLU·mul); the torch path computes the same values op by op and is its twin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.lora.slot_weights import SlotWeights
from services.gpu_worker.lora.torch_backend import TorchLoRABackend
from services.gpu_worker.model.linear import can_prepack, linear, prepack
from services.gpu_worker.model.rope import apply_rope, rope_tables
from services.gpu_worker.model.weights import ModelWeights, load_weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """Weights plus the forward pass; holds no per-request state (that is in ForwardBatch and the KV cache)."""

    def __init__(
        self, model_dir, config, dtype: torch.dtype, device: torch.device, max_positions: int, lora_backend=None,
        attention_backend: str = "torch",
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_width = self.num_heads * self.head_dim
        self.kv_width = self.num_kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.weights: ModelWeights = load_weights(model_dir, config, dtype, device)
        # The projections' weights in the layout the CPU's linear primitive reads fastest (see linear.py); the
        # lm_head is packed apart, as a tied one is also the embedding table (looked up by row).
        self.lm_head = self.weights.lm_head
        self.linear_kernels = "onednn" if can_prepack(device, dtype) else "torch"  # part of a cached profile's key
        if self.linear_kernels == "onednn":
            for lw in self.weights.layers:
                lw.qkv, lw.o, lw.gate_up, lw.down = (prepack(t) for t in (lw.qkv, lw.o, lw.gate_up, lw.down))
            self.lm_head = prepack(self.weights.lm_head)
        self.cos, self.sin = rope_tables(config, max_positions, device)
        # prepare(info, slots) once per step, apply(y, x, slots, layer, group, info) per layer and group
        # (the torch backend bags short segments on the CPU: see lora/bagged_pool.py)
        self.lora_backend = lora_backend or TorchLoRABackend(bagged=device.type == "cpu")
        # "torch": SDPA over gathered cache slots (the CPU path and the oracle); "triton": the paged-attention
        # kernels over block tables (services/gpu_worker/attention); the runner builds the matching metadata
        self.attention_backend = attention_backend
        # the Triton path also fuses the pointwise steps around attention and the GEMMs (model/fused_layer_ops.py):
        # 4 launches a layer (two norms, RoPE + cache write, SiLU·mul) where their torch twins take ~35 ops
        self.fused = self.paged_attention = None
        if attention_backend == "triton":  # imported here: triton is not needed (nor loaded) on the torch path
            from services.gpu_worker.attention import triton_paged_attention
            from services.gpu_worker.model import fused_layer_ops

            self.fused, self.paged_attention = fused_layer_ops, triton_paged_attention

    def lora_part_widths(self) -> dict[str, int]:
        """Output width of each LoRA target inside its fused projection."""
        h = self.config.hidden_size
        return {
            "q_proj": self.q_width, "k_proj": self.kv_width, "v_proj": self.kv_width, "o_proj": h,
            "gate_proj": self.intermediate, "up_proj": self.intermediate, "down_proj": h,
        }

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [layers, slots, kv_heads, head_dim]
        v_cache: torch.Tensor,
        lora_slots: list[SlotWeights | None],
    ) -> torch.Tensor:
        """Logits ([S, vocab], float32) at `batch.logits_indices`."""
        w = self.weights
        lora = batch.lora
        rope = self._rope_inputs(batch)
        residual, delta = w.embed[batch.input_ids], None  # [T, hidden]; the stream is residual + delta
        # a backend whose deltas are computed elsewhere (CPU assist) gets the input before the base projection
        begin = getattr(self.lora_backend, "begin", None) if lora is not None else None
        for i, lw in enumerate(w.layers):
            x, residual = self._add_norm(delta, residual, lw.input_norm)
            if begin is not None:
                begin(x, lora_slots, i, "qkv", lora)
            qkv = linear(x, lw.qkv, lw.qkv_bias)  # [T, q + 2 kv]
            if lora is not None:
                self.lora_backend.apply(qkv, x, lora_slots, i, "qkv", lora)
            q, k, v = self._rope_and_cache(qkv, rope, k_cache[i], v_cache[i], batch)
            attn = self._attention(q, k, v, k_cache[i], v_cache[i], batch)  # [T, q_width]
            if begin is not None:
                begin(attn, lora_slots, i, "o", lora)
            o = linear(attn, lw.o, lw.o_bias)
            if lora is not None:
                self.lora_backend.apply(o, attn, lora_slots, i, "o", lora)
            x, residual = self._add_norm(o, residual, lw.post_norm)
            if begin is not None:
                begin(x, lora_slots, i, "gate_up", lora)
            gate_up = linear(x, lw.gate_up)
            if lora is not None:
                self.lora_backend.apply(gate_up, x, lora_slots, i, "gate_up", lora)
            act = self._silu_mul(gate_up)
            if begin is not None:
                begin(act, lora_slots, i, "down", lora)
            delta = linear(act, lw.down)
            if lora is not None:
                self.lora_backend.apply(delta, act, lora_slots, i, "down", lora)
        idx = batch.logits_indices
        last, _ = self._add_norm(delta[idx], residual[idx], w.norm)
        return linear(last, self.lm_head).float()

    # ---- the layer's pointwise steps: fused Triton kernels on the Triton path, their torch twins otherwise ----

    def _add_norm(self, delta: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor):
        """(RMSNorm(residual + delta), residual + delta); residual is updated in place on the Triton path."""
        if self.fused is not None:
            if delta is None:
                return self.fused.rms_norm(residual, weight, self.eps), residual
            return self.fused.rms_norm(delta, weight, self.eps, residual=residual), residual
        if delta is not None:
            residual = residual + delta
        return rms_norm(residual, weight, self.eps), residual

    def _rope_inputs(self, batch: ForwardBatch):
        if self.fused is not None:  # the kernel reads the float32 tables at the positions itself
            return None
        return self.cos[batch.positions].to(self.dtype), self.sin[batch.positions].to(self.dtype)

    def _rope_and_cache(self, qkv: torch.Tensor, rope, k_layer: torch.Tensor, v_layer: torch.Tensor,
                        batch: ForwardBatch):
        """q ([T, H, D]) and this step's k, v ([T, KVH, D]; None on the Triton path, whose attention reads them from
        the cache) after RoPE, with k and v written to the tokens' cache slots."""
        if self.fused is not None:
            q = self.fused.rope_and_cache(qkv, batch.positions, self.cos, self.sin, k_layer, v_layer,
                                          batch.slot_mapping, self.num_heads, self.num_kv_heads)
            return q, None, None
        cos, sin = rope
        q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_layer[batch.slot_mapping] = k
        v_layer[batch.slot_mapping] = v
        return q, k, v

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.silu_mul(gate_up)
        gate, up = gate_up.split([self.intermediate, self.intermediate], dim=-1)
        return F.silu(gate) * up

    def _attention(self, q, k, v, k_layer, v_layer, batch: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] (this step's); k_layer, v_layer: [slots, KVH, D] (the cache, already written)
        if self.attention_backend == "triton":
            return self._paged_attention(q, k_layer, v_layer, batch)
        out = torch.empty_like(q)
        for p in batch.prefills:
            qs = q[p.start : p.start + p.length].transpose(0, 1)  # [H, n, D]
            if p.slots is None:  # no cached context: plain causal attention over the chunk itself
                ks = k[p.start : p.start + p.length].transpose(0, 1)
                vs = v[p.start : p.start + p.length].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            else:  # chunk after cached context: query j sees keys 0 .. context + j
                ks = k_layer[p.slots].transpose(0, 1)  # [KVH, ctx + n, D]
                vs = v_layer[p.slots].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=self.scale, enable_gqa=True)
            out[p.start : p.start + p.length] = o.transpose(0, 1)
        if batch.decode_token_indices is not None:
            idx = batch.decode_token_indices
            qd = q[idx].unsqueeze(2)  # [B, H, 1, D]
            kd = k_layer[batch.decode_slots].transpose(1, 2)  # [B, KVH, L, D]
            vd = v_layer[batch.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=self.scale, enable_gqa=True)
            out[idx] = o.squeeze(2)
        return out.view(q.shape[0], -1)

    def _paged_attention(self, q, k_layer, v_layer, batch: ForwardBatch) -> torch.Tensor:
        """The triton backend: prefill chunks and decodes read the cache through the step's block tables."""
        kernels = self.paged_attention
        out = torch.empty_like(q)  # [T, H, D]: the prefill kernel writes its chunks' rows, the decodes the others
        if (p := batch.paged_prefill) is not None:
            kernels.paged_attention_prefill(q, k_layer, v_layer, p.block_tables, p.query_start, p.query_lens,
                                            p.context_lens, p.max_query_len, p.block_size, self.scale, out=out)
        if (d := batch.paged_decode) is not None:
            if not batch.prefills:  # decodes only: every row is one, in order (ModelRunner.prepare), so no gather
                kernels.paged_attention_decode(q, k_layer, v_layer, d.block_tables, d.context_lens, d.block_size,
                                               self.scale, out=out)
            else:
                idx = batch.decode_token_indices
                out[idx] = kernels.paged_attention_decode(q[idx], k_layer, v_layer, d.block_tables, d.context_lens,
                                                          d.block_size, self.scale)
        return out.view(q.shape[0], -1)
