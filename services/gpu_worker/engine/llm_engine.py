"""`LLMEngine`: the synchronous engine core — add_request, step, abort, adapter load/unload.

A step is three calls (as nano-vllm): `scheduler.schedule()` picks the sequences and token counts,
`runner.run()` computes and samples, `_postprocess()` appends tokens, detokenizes, checks stop conditions and
frees what finished. No asyncio or NATS here: the services wrap this class.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoTokenizer

from shared.adapters import BaseModelShape, LoRAAdapter, load_adapter
from shared.model_provisioning import resolve_model
from shared.protocol import ADAPTER_NAME_PATTERN
from services.gpu_worker.engine.adapter_cache import AdapterCache
from services.gpu_worker.engine.block_manager import BlockManager
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.detokenizer import IncrementalDetokenizer
from services.gpu_worker.engine.model_runner import ModelRunner
from services.gpu_worker.engine.scheduler import ScheduledBatch, Scheduler
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, SamplingParams, Sequence, TokenLogprob
from services.gpu_worker.lora.slot_weights import SlotWeights, build_slot_weights, write_slot_layers
from services.gpu_worker.model.llama import LlamaModel
from services.gpu_worker.model.weights import check_supported

log = logging.getLogger(__name__)


def pipelines_loads(device: torch.device) -> bool:
    """Whether cpu_assist auto pipelines cold adapters' loads on `device`: on a GPU (on a CPU device the CPU would
    compute both sides, so there is nothing to overlap)."""
    return device.type == "cuda"


class EngineRequestError(ValueError):
    """A request or adapter operation the engine refuses; the message is one line for the client, `status` and
    `code` say how an API answers it (OpenAI's HTTP status and error code)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class GenerationResult:
    """A finished request, gathered by `generate()`."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resolved = resolve_model(config.model, config.data_dir)
        self.model_path = resolved.path
        self.model_name = config.served_model_name or resolved.name
        self.hf_config = AutoConfig.from_pretrained(resolved.path)
        check_supported(self.hf_config)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        device, dtype = config.torch_device(), config.torch_dtype()

        c = self.hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        token_bytes = 2 * c.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_memory_gb * 2**30) // (token_bytes * config.block_size))
        limit = config.max_model_len or c.max_position_embeddings
        if getattr(c, "sliding_window", None) and c.model_type == "mistral":
            limit = min(limit, c.sliding_window)  # attention here is full-context: identical only within the window
        self.max_model_len = min(limit, num_blocks * config.block_size)

        self.model = LlamaModel(resolved.path, c, dtype, device, max_positions=self.max_model_len,
                                attention_backend=config.resolved_attention_backend())
        self.base_shape = BaseModelShape.from_hf_config(c)
        widths = self.model.lora_part_widths()
        self.lora_backend = config.resolved_lora_backend()
        self._lora_pool = None  # the Triton backend's device pool
        if self.lora_backend == "triton":  # adapters live in a device pool the kernels index
            from services.gpu_worker.lora.gpu_pool import LoRAGpuPool
            from services.gpu_worker.lora.triton_backend import TritonLoRABackend

            pool = LoRAGpuPool(c.num_hidden_layers, widths, LoRAGpuPool.in_features_from_widths(widths),
                               config.max_loras, config.max_lora_rank, dtype, device)
            self.model.lora_backend = TritonLoRABackend(pool)
            self._lora_pool = pool
            log.info("LoRA: triton kernels, adapter pool %.1f MiB", pool.nbytes() / 2**20)
            self.adapters = AdapterCache(config.max_loras, pool.build, pool.free)
        else:
            self.adapters = AdapterCache(
                config.max_loras, lambda a: build_slot_weights(a, c.num_hidden_layers, widths, dtype, device)
            )
        self._device, self._dtype, self._widths = device, dtype, widths
        self.cpu_assist = None
        assist = config.cpu_assist
        if assist == "auto" and not pipelines_loads(device):
            log.info("cpu_assist auto: no GPU (%s), so nothing to overlap: cold adapters load at once, as with off",
                     device)
            assist = "off"
        if assist != "off":
            from services.cpu_prefill.assist import CpuAssist
            from services.gpu_worker.lora.pipelined_load import PipelinedLoader

            auto = dict(mode="auto", reserve_slot=self._reserve_slot,
                        loader=PipelinedLoader(device, threaded=config.load_enqueue == "thread"),
                        load_groups=-(-c.num_hidden_layers // config.load_group_layers)) if assist == "auto" else {}
            self.cpu_assist = CpuAssist(
                self.model, self.adapters, c.num_hidden_layers, widths, num_workers=config.cpu_workers,
                max_tokens=config.max_num_batched_tokens, host_cache_bytes=int(config.host_cache_gb * 2**30),
                data_dir=config.data_dir,  # cpu_prefill processes join at <data dir>/run/cpu_prefill/
                **auto,
            )
            if assist == "auto" and self._lora_pool is not None:
                # no row moves under a load that is still writing
                self._lora_pool.before_compact = self.cpu_assist.wait_for_loads
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, self.adapters, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.adapters.slots)
        if config.resolved_cuda_graphs():  # captured lazily per batch bucket, or all at once by kernel warm-up
            from services.gpu_worker.engine.decode_graphs import DecodeGraphs

            self.runner.decode_graphs = DecodeGraphs(self.runner, config.max_num_seqs, self.max_model_len,
                                                     capture=True)
        self.eos_ids = self._eos_ids()
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[RequestOutput] = []
        self._arrival = itertools.count()
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d, max_model_len %d",
            self.model_name, device, str(dtype).removeprefix("torch."), num_blocks, config.block_size, self.max_model_len,
        )

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.hf_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(source)
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            ids.update([gen] if isinstance(gen, int) else gen or [])
        except OSError:
            pass
        return ids

    # ---- adapters ----
    def _reserve_slot(self, adapter: LoRAAdapter):
        """(slot content, write(layers)) for a pipelined load (cpu_assist auto): the content goes in the adapter's
        slot at once, `write` fills the given layers (on the loader's side stream on a GPU)."""
        pool = self._lora_pool
        if pool is not None:
            handle = pool.reserve(adapter)
            return handle, lambda layers: pool.write_layers(handle, adapter, layers)
        weights: SlotWeights = [{} for _ in range(self.hf_config.num_hidden_layers)]
        main = torch.cuda.current_stream(self._device) if self._device.type == "cuda" else None

        def write(layers: range) -> None:
            write_slot_layers(weights, adapter, layers, self._widths, self._dtype, self._device)
            if main is not None:  # made on the side stream, read on the main one: not reused before it has
                for layer in layers:
                    for gw in weights[layer].values():
                        gw.a.record_stream(main)
                        for part in gw.parts:
                            part.b_scaled.record_stream(main)

        return weights, write

    def load_adapter(self, name: str, path) -> LoRAAdapter:
        """Validate and register an adapter (host tier); it is put in a slot when a request needs it."""
        return self.register_adapter(self.read_adapter(name, path))

    def read_adapter(self, name: str, path) -> LoRAAdapter:
        """An adapter's files read and validated for this base model, not registered. It touches no engine state
        and runs no torch op, so a server can parse on another thread while the engine steps and register between
        steps (see gpu_worker/service.py)."""
        if not ADAPTER_NAME_PATTERN.match(name or ""):
            raise EngineRequestError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
        if name == self.model_name:
            raise EngineRequestError(f"adapter name {name!r} is the base model's name")
        return load_adapter(path, self.base_shape, self.config.max_lora_rank, name=name)

    def register_adapter(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Register an adapter already validated against this base model (load_adapter, or built in memory as
        the profiler's random adapters are)."""
        if adapter.max_rank > self.config.max_lora_rank:
            raise EngineRequestError(f"adapter {adapter.name!r} has rank {adapter.max_rank}, above this engine's "
                                     f"max_lora_rank {self.config.max_lora_rank}")
        try:
            self.adapters.register(adapter)
        except ValueError as e:  # in use or being removed: retry later
            raise EngineRequestError(str(e), status=409) from None
        if self.cpu_assist is not None:
            self.cpu_assist.add(adapter)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name` at once; its running requests finish, then its slot is freed."""
        try:
            self.adapters.unregister(name)
        except KeyError:
            raise EngineRequestError(f"adapter {name!r} is not loaded") from None
        if self.cpu_assist is not None:
            self.cpu_assist.remove(name)  # its remaining prefills (if any) run on the device

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters.registered)

    # ---- requests ----
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Apply the tokenizer's chat template (with the assistant turn opened) and tokenize."""
        if not isinstance(messages, list) or not messages:
            raise EngineRequestError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngineRequestError("each message must be an object with string 'role' and 'content'")
        if not self.tokenizer.chat_template:
            raise EngineRequestError(f"model {self.model_name!r} has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> None:
        if request_id in self._seqs:
            raise EngineRequestError(f"request id {request_id!r} is already running")
        if adapter == self.model_name:
            adapter = None
        if adapter is not None and not self.adapters.is_available(adapter):
            raise EngineRequestError(f"unknown model or adapter {adapter!r}", status=404, code="model_not_found")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EngineRequestError("the prompt is empty")
        vocab = self.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise EngineRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise EngineRequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
                code="context_length_exceeded",
            )
        seq = Sequence(request_id, ids, params, adapter, next(self._arrival))
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks and adapter slot; its final output comes with the next step."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        detok = self._detok.pop(request_id)
        del self._seqs[request_id]
        self._aborted.append(
            RequestOutput(request_id, [], detok.take(final=True), True, FinishReason.ABORT,
                          prompt_tokens=seq.prompt_len, completion_tokens=seq.num_generated)
        )
        return True

    def close(self) -> None:
        """Free what outlives the process's memory: the cpu_prefill workers and shared-memory segments."""
        if self.cpu_assist is not None:
            self.cpu_assist.close()

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._aborted)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- the step ----
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        sampled = self.runner.run(sched)
        outputs.extend(self._postprocess(sched, sampled))
        return outputs

    def _postprocess(self, sched: ScheduledBatch, sampled: dict[int, tuple[int, TokenLogprob | None]]) -> list[RequestOutput]:
        outputs = []
        for j, seq in enumerate(sched.seqs):
            seq.num_computed += sched.num_tokens[j]
        for j, (token, logprob) in sampled.items():
            seq = sched.seqs[j]
            seq.token_ids.append(token)
            detok = self._detok[seq.request_id]
            p = seq.params
            reason = None
            if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                reason = FinishReason.STOP
            elif detok.add(token):
                reason = FinishReason.STOP
            elif seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = FinishReason.LENGTH
            finished = reason is not None
            outputs.append(
                RequestOutput(
                    seq.request_id, [token], detok.take(final=finished), finished, reason,
                    [logprob] if logprob is not None else None, seq.prompt_len, seq.num_generated,
                )
            )
            if finished:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self._seqs[seq.request_id], self._detok[seq.request_id]
        return outputs

    # ---- convenience ----
    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Run prompts to completion through continuous batching; results in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        results = {}
        base = f"gen-{next(self._arrival)}-"
        for i, (prompt, p, a) in enumerate(zip(prompts, params_list, adapters)):
            self.add_request(base + str(i), prompt, p, a)
            results[base + str(i)] = GenerationResult(base + str(i))
        while self.has_unfinished():
            for out in self.step():
                r = results.get(out.request_id)
                if r is None:
                    continue
                r.token_ids += out.new_token_ids
                r.text += out.new_text
                r.logprobs += out.logprobs or []
                r.prompt_tokens = out.prompt_tokens
                if out.finished:
                    r.finish_reason = out.finish_reason
        return list(results.values())
