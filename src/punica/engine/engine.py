"""Engine: one base model, many adapters, continuous batching. Single-threaded; the server runs its
`step` loop in a thread of its own."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import torch

from punica.config import KV_CACHE_DTYPES, EngineConfig, RuntimeInfo, engine_config, read_model_config
from punica.engine.cuda_graph import CudaGraphRunner
from punica.engine.json_mode import JsonGrammar, TokenGrammar, Vocabulary
from punica.engine.json_schema import AutoCallGrammar, RegexGrammar, SchemaGrammar, ToolCallGrammar
from punica.engine.memory import kv_cache_blocks
from punica.engine.request import RequestOutput, SamplingParams, Sequence, Status, TokenLogprobs
from punica.engine.runner import InFlight, ModelRunner
from punica.engine.scheduler import Scheduler
from punica.engine.tokenizer import Tokenizer
from punica.errors import BadRequestError, CapacityError, ConfigError
from punica.kv.block_manager import BlockManager
from punica.kv.cache import allocate_kv_pool
from punica.lora.manager import AdapterManager
from punica.lora.peft import LoRAWeights
from punica.lora.pool import AdapterPool
from punica.model.gguf_convert import model_dir
from punica.model.loader import DTYPES, load_model
from punica.ops import resolve_backend, select_ops

log = logging.getLogger("punica.engine")
MAX_SCHEMAS = 64  # compiled JSON schemas kept (each with its masks on the device)
STALLED_WAIT_S = 0.005  # nothing could be scheduled (e.g. the queue waits on adapter reads): a driver's pause


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA where there is a device, else the CPU. ConfigError for a device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s) visible to torch "
                              f"{torch.__version__}; use --device cpu or another index")
    return dev


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype on CUDA, float32 on the CPU (where half precision is slow)."""
    if dtype == "auto":
        return DTYPES.get(checkpoint_dtype, torch.float32) if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def check_fp8_support(option: str, plain: str, device: torch.device, backend: str) -> None:
    """ConfigError where the Triton kernels cannot convert fp8 (GPUs before compute capability 8.9): `option`
    (e.g. "kv_cache_dtype='fp8'") asked for it, `plain` is its value without fp8."""
    if backend == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"{option} needs a GPU of compute capability 8.9 or later (Ada, Hopper) for the Triton "
                          f"kernels' fp8 conversions; this one is {major}.{minor}: use {plain} or backend 'torch'")


def resolve_kv_dtype(kv_cache_dtype: str, dtype: torch.dtype, device: torch.device, backend: str) -> torch.dtype:
    """The KV pool's dtype: the model's for "auto", else CacheConfig.kv_cache_dtype's (check_fp8_support)."""
    name = KV_CACHE_DTYPES[kv_cache_dtype]
    if name is None:
        return dtype
    check_fp8_support(f"kv_cache_dtype={kv_cache_dtype!r}", "kv_cache_dtype 'auto'", device, backend)
    return getattr(torch, name)


class Engine:
    """add_request -> step (repeatedly) -> RequestOutputs; abort at any time."""

    def __init__(self, config: EngineConfig, lora_modules: dict[str, str] | None = None):
        if lora_modules is not None and (not isinstance(lora_modules, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, os.PathLike)) for k, v in lora_modules.items())):
            raise ConfigError(f"lora_modules must map adapter names to PEFT directories, got {lora_modules!r}")
        if not isinstance(config.model, (str, os.PathLike)) or not str(config.model):
            raise ConfigError(f"model must be a model directory or a .gguf file (a path), got {config.model!r}")
        resolved = model_dir(config.model)  # a llama.cpp .gguf file: its conversion, cached, is what loads
        if resolved != config.model:
            config = dataclasses.replace(config, model=resolved)
        self.config = config
        device = resolve_device(config.device)
        model_cfg = read_model_config(config.model)
        dtype = resolve_dtype(config.dtype, model_cfg.torch_dtype, device)
        backend = resolve_backend(config.backend, device)
        torch.manual_seed(config.seed)
        if config.quantization == "fp8":
            check_fp8_support("quantization='fp8'", "quantization 'none'", device, backend)
        self.model = load_model(config.model, select_ops(backend), dtype, device, config.load_format,
                                config.quantization)
        if backend == "triton" and device.type == "cuda":
            self.model.overlap_lora(config.lora_overlap, config.lora_stream_priority)
        self.model_config = model_cfg
        self.tokenizer = Tokenizer.from_dir(config.model)
        block_size = config.cache.block_size
        asked = config.scheduler.max_model_len
        if asked is not None and asked > model_cfg.max_position_embeddings:
            raise ConfigError(f"max_model_len={asked} exceeds the model's max_position_embeddings="
                              f"{model_cfg.max_position_embeddings}")
        max_len = min(asked or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        # the adapter slots and the largest step's activations first, the KV cache from what is left
        layers = [self.model.lora_modules(i) for i in range(model_cfg.num_layers)]
        pool = AdapterPool(layers, config.lora.max_loras, config.lora.max_lora_rank, dtype, device,
                           config.lora.enable_dora)
        kv_dtype = resolve_kv_dtype(config.cache.kv_cache_dtype, dtype, device, backend)
        num_blocks, reserve = kv_cache_blocks(self.model, pool.slot_rank, config, model_cfg, max_len, kv_dtype,
                                              device)
        self.model.bind_kv_cache(allocate_kv_pool(model_cfg, num_blocks, block_size, kv_dtype, device))
        if max_len > num_blocks * block_size:
            if asked is not None:
                raise ConfigError(f"max_model_len={asked} exceeds the KV cache's {num_blocks} blocks of {block_size} "
                                  f"tokens; raise num_blocks (or the memory for them) or lower max_model_len")
            log.warning("max_model_len is %d, what the KV cache's %d blocks of %d tokens hold (the model allows %d)",
                        num_blocks * block_size, num_blocks, block_size, max_len)
            max_len = num_blocks * block_size
        self.info = RuntimeInfo(device=str(device), dtype=str(dtype).removeprefix("torch."), backend=backend,
                                num_blocks=num_blocks, max_model_len=max_len, step_reserve_bytes=reserve,
                                kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
                                quantization=config.quantization)
        self.adapters = AdapterManager(model_cfg, config.lora, pool, dtype)
        self.blocks = BlockManager(num_blocks, block_size, caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.adapters,
                                   max_prefetch_loras=config.lora.max_cpu_loras)
        self.runner = ModelRunner(self.model, pool.slot_rank, block_size, device, config.scheduler.max_num_seqs,
                                  self._graphs(pool, max_len), tuple(model_cfg.eos_token_ids))
        self._in_flight: InFlight | None = None  # the step launched last, its tokens not yet read
        self._carried: list[RequestOutput] = []  # outputs of a step whose successor failed to launch
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.eos_ids = set(model_cfg.eos_token_ids)
        self._vocab: Vocabulary | None = None  # the tokens' bytes, for JSON modes (built on first use)
        self._grammars: dict[str, TokenGrammar] = {}  # SamplingParams.grammar_key -> its grammar
        self._vocab_lock, self._grammars_lock = threading.Lock(), threading.Lock()  # grammar() is thread-safe
        self.num_preemptions = 0
        for name, path in (lora_modules or {}).items():
            self.add_lora(name, path)

    def _graphs(self, pool: AdapterPool, max_len: int) -> CudaGraphRunner | None:
        """CUDA graphs of every step on the Triton backend unless enforce_eager (the torch ops sync the host)."""
        if self.config.enforce_eager or self.info.backend != "triton" or self.info.device == "cpu":
            return None
        sched = self.config.scheduler
        tokens = min(self.config.max_graph_tokens or sched.max_num_batched_tokens, sched.max_num_batched_tokens)
        graphs = CudaGraphRunner(self.model, pool.slot_rank, sched.max_num_seqs, max(tokens, sched.max_num_seqs),
                                 max_len, self.config.cache.block_size, torch.device(self.info.device))
        log.info("capturing %d CUDA graphs: decode steps of 1-%d sequences, mixed steps of up to %d tokens "
                 "(--enforce-eager skips this)", len(graphs.graphs), graphs.buckets[-1], graphs.token_buckets[-1])
        try:
            graphs.capture()
        except torch.OutOfMemoryError as exc:
            raise CapacityError(f"capturing CUDA graphs ran out of device memory; lower memory_fraction (now "
                                f"{self.config.cache.memory_fraction}: the graphs live in the rest), max_num_seqs or "
                                "max_graph_tokens, or pass enforce_eager (--enforce-eager)") from exc
        log.info("captured %d CUDA graphs in %.1f s, %.0f MiB of device memory", len(graphs.graphs),
                 graphs.capture_s, graphs.capture_bytes / 2 ** 20)
        return graphs

    @classmethod
    def from_args(cls, model: str, lora_modules: dict[str, str] | None = None, **options) -> Engine:
        return cls(engine_config(model=model, **options), lora_modules)

    # adapters
    def read_lora(self, name: str, path: str) -> LoRAWeights:
        """Read and validate an adapter for `add_lora` without touching the engine: safe on any thread, so a
        server reads beside the engine thread instead of stalling its steps."""
        return self.adapters.read(name, path)

    def add_lora(self, name: str, path: str, weights: LoRAWeights | None = None, confined: bool = False) -> None:
        """Serve the adapter at `path` as `name` (`weights`: what `read_lora` returned, else read here).
        `confined`: every later read from disk checks again that its files stay inside the allowed
        directories (`LoRAConfig.allowed_lora_dirs`), as a dynamic load's first read did."""
        self.adapters.register(name, path, weights, confined)

    def remove_lora(self, name: str) -> Future | None:
        """New requests for `name` fail from now on; those in flight finish on its weights. Returns the disk
        read that brings those weights back into memory when the CPU cache no longer has them: the
        adapter's directory must stay until it is done."""
        return self.adapters.unregister(name)

    def list_loras(self) -> dict[str, str]:
        return dict(self.adapters.paths)

    # requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: str | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises BadRequestError, UnknownModelError or CapacityError."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise BadRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        vocab = self.model_config.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted by id
            raise BadRequestError(f"logit_bias names token {params.logit_bias[-1][0]}; token ids are below {vocab}")
        grammar = self.grammar(params)
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise CapacityError(f"{len(self.scheduler.waiting)} requests are waiting already; retry later")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise BadRequestError(f"request id {request_id!r} is already in use")
        key = self.adapters.ref(lora) if lora is not None else None
        after = self.model_config.long_rope_after
        seq = Sequence(request_id=request_id, prompt_ids=ids, params=params, lora=lora, lora_key=key,
                       cache_namespace=None if key is None else (key, self.adapters.load_ids[key]),
                       rope_long=None if after is None else (after, self.model_config.max_position_embeddings),
                       grammar=grammar, grammar_state=None if grammar is None else grammar.start)
        if after is not None and len(ids) > after:
            seq.use_long_rope()
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def grammar(self, params: SamplingParams) -> TokenGrammar | None:
        """The grammar that masks this request's draws (JSON, JSON-schema, tool-call or regex mode), built on first
        use: the vocabulary's byte tries once (about half a second for 49k tokens), each schema or pattern once (kept
        for the MAX_SCHEMAS most recent). Thread-safe: the server builds a request's grammar on a worker thread before
        queueing it (AsyncEngine.add), so the engine thread, which serves everyone, finds it built."""
        key = params.grammar_key
        if key is None:
            return None
        with self._grammars_lock:
            grammar = self._grammars.pop(key, None)
        if grammar is None:  # built outside the lock: other threads find theirs meanwhile
            vocab = self._vocabulary()
            kind, _, text = key.partition(":")
            if kind == "json_object":
                grammar = JsonGrammar(vocab)
            elif kind == "schema":
                grammar = SchemaGrammar(vocab, json.loads(text))
            elif kind in ("tools", "auto"):
                shape, _, tools = text.partition(":")
                grammar = (ToolCallGrammar if kind == "tools" else AutoCallGrammar)(vocab, json.loads(tools), shape)
            else:  # regex: the pattern and the request's stop token ids, which end it like EOS
                pattern, stop_ids = json.loads(text)
                grammar = RegexGrammar(vocab, pattern, (*self.eos_ids, *stop_ids))
        with self._grammars_lock:
            grammar = self._grammars.setdefault(key, grammar)  # most recent last; one built meanwhile wins
            while len(self._grammars) > MAX_SCHEMAS:
                self._grammars.pop(next(iter(self._grammars)))
        return grammar

    def _vocabulary(self) -> Vocabulary:
        with self._vocab_lock:
            if self._vocab is None:
                if self.tokenizer is None:
                    raise BadRequestError("constrained output (JSON, schema, tool-call, regex) needs the model's "
                                          "tokenizer.json (the bytes of each token)")
                self._vocab = Vocabulary(self.tokenizer.token_bytes, self.model_config.vocab_size)
            return self._vocab

    def add_requests(self, prompts: list[str] | list[list[int]], params: list[SamplingParams],
                     loras: list[str | None]) -> list[str]:
        """Queue one request per prompt, all or none: if one is refused, those already queued are aborted
        and the error is raised."""
        if not len(prompts) == len(params) == len(loras):
            raise BadRequestError(f"{len(prompts)} prompts need as many params and loras, got {len(params)} "
                                  f"and {len(loras)}")
        limit = self.config.scheduler.max_waiting
        if len(prompts) > limit:
            raise BadRequestError(f"{len(prompts)} sequences in one request (prompts x n) exceed the {limit} that "
                                  "may wait at once (max_waiting); split the request")
        added: list[str] = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                added.append(self.add_request(prompt, p, lora))
        except BaseException:
            for rid in added:
                self.abort(rid)
            raise
        return added

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, (str, list, tuple)):
            raise BadRequestError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequestError("this model directory has no tokenizer.json: pass token ids, not text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise BadRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise BadRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.info.max_model_len:
            raise BadRequestError(f"the prompt has {len(ids)} tokens but the context holds "
                                  f"{self.info.max_model_len} (max_model_len), including at least one new token")
        return ids

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks and adapter slot; False if it is unknown or done."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        """Launch the next batch, then report every request that gained a token or finished in the batch
        before it. The device runs one step while the host reads the previous one's tokens and schedules
        the next: a request's tokens arrive one step() after the step that computed them."""
        previous, self._in_flight = self._in_flight, None

        def read_previous() -> None:  # JSON-mode masks need its tokens: read while this step's model runs
            nonlocal previous
            if previous is not None:
                self._carried += self._read(previous)
            previous = None

        try:
            step = self.scheduler.schedule()
            self.num_preemptions += len(step.preempted)
            for seq, error in step.failed:
                self._carried.append(self._fail(seq, f"adapter {seq.lora!r} could not be read: {error}"))
            if step.work:
                self._in_flight = self.runner.launch(step.work, previous, read_previous)
                self.scheduler.launched(step.work)
                for seq in self._in_flight.seqs:  # its pending token is its last: not scheduled again
                    seq.finishing = self._at_length_limit(seq, len(seq.tokens))
        except BaseException:  # an error, or Ctrl-C mid-step: the previous step's tokens are still good
            if previous is not None:  # report them with the next step, or placeholders wait for them forever
                self._carried += self._read(previous)
            raise
        return self._report(previous)

    def sync(self) -> list[RequestOutput]:
        """Wait for the step in flight and report its tokens, launching nothing new."""
        previous, self._in_flight = self._in_flight, None
        return self._report(previous)

    def _report(self, previous: InFlight | None) -> list[RequestOutput]:
        """Outputs held back by a failed launch, then those of `previous`."""
        outputs, self._carried = self._carried, []
        return outputs + (self._read(previous) if previous is not None else [])

    def _read(self, launched: InFlight) -> list[RequestOutput]:
        """Put a finished step's tokens in place of their placeholders and report them."""
        outputs = []
        tokens = launched.tokens()
        launched.fill_prompt_logprobs()  # before the tokens: a sequence's first output carries them all
        for seq, token, logprobs in zip(launched.seqs, tokens, launched.logprobs(tokens)):
            if seq.status is Status.FINISHED:  # aborted, or stopped while this step ran
                continue
            outputs.append(self._accept(seq, token, logprobs))
        return outputs

    def _accept(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        old_text, known = seq.text, seq.num_known
        seq.tokens[known] = token  # the first placeholder
        seq.num_pending -= 1
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if seq.grammar_error is not None:  # its row was drawn without a mask: nothing is kept of it
            return self._fail(seq, seq.grammar_error)
        if seq.grammar is not None:  # first: the state after the token says whether stop strings apply
            seq.grammar_state = seq.grammar.advance(seq.grammar_state, token)
            if seq.grammar_state is None:  # the mask allows no such token: a bug, reported as this request's error
                return self._fail(seq, f"constrained output: token {token} does not continue it (a grammar bug)")
        reason = self._stop_reason(seq, token)
        if seq.grammar is not None and seq.grammar.done(seq.grammar_state) and reason is None:
            reason = "stop"  # the constrained value is complete
        if reason is not None:
            self._finish(seq, reason)
        return self._output(seq, [token], seq.text[len(old_text):], None if logprobs is None else [logprobs])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        at_limit = self._at_length_limit(seq, seq.num_known)
        if self.tokenizer is not None:
            # the last token's text is decided now, without waiting for more; a stopping token's own text is left
            # out of the text unless include_stop_str_in_output (with skip_special_tokens off it has some)
            end = seq.num_known - (stop_token and not p.include_stop_str_in_output)
            delta, seq.detok_prefix, seq.detok_read = self.tokenizer.decode_delta(
                seq.tokens, seq.detok_prefix, seq.detok_read, end, p.skip_special_tokens, final=stop_token or at_limit)
            if delta:
                start = max(0, len(seq.text) - max((len(s) for s in p.stop), default=1) + 1)
                seq.text += delta
                # stop strings where the new text can complete one, once min_tokens are out; constrained output
                # ends where its value does
                looked_for = seq.num_known - len(seq.prompt_ids) >= p.min_tokens and (
                    seq.grammar is None or seq.grammar.free(seq.grammar_state))
                for stop in p.stop if looked_for else ():
                    at = seq.text.find(stop, start)
                    if at >= 0:
                        seq.text = seq.text[:at + len(stop) if p.include_stop_str_in_output else at]
                        return "stop"
        if stop_token:
            return "stop"
        return "length" if at_limit else None

    def _at_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` with `num_tokens` tokens (prompt included) has reached max_tokens or max_model_len."""
        return num_tokens - len(seq.prompt_ids) >= seq.params.max_tokens or num_tokens >= self.info.max_model_len

    def _finish(self, seq: Sequence, reason: str) -> None:
        del seq.tokens[seq.num_known:]  # tokens of steps still in flight are dropped
        seq.num_pending = 0
        self.scheduler.finish(seq, reason)
        self.runner.forget(seq)
        self._requests.pop(seq.request_id, None)
        if seq.lora is not None:
            self.adapters.unref(seq.lora_key)

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """Finish `seq` with an error (the others carry on)."""
        self._finish(seq, "error")
        return dataclasses.replace(self._output(seq, [], ""), error=message)

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str,
                new_logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
        logprobs = None if seq.logprobs is None else list(seq.logprobs)
        if logprobs is not None and new_logprobs is None:
            new_logprobs = []
        return RequestOutput(request_id=seq.request_id, token_ids=seq.output_ids, text=seq.text,
                             new_token_ids=new_ids, new_text=new_text, finished=seq.status is Status.FINISHED,
                             finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_ids), lora=seq.lora,
                             logprobs=logprobs, new_logprobs=new_logprobs, prompt_logprobs=seq.prompt_logprobs,
                             num_cached_tokens=seq.num_cached_tokens)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               lora: str | None = None) -> Iterator[RequestOutput]:
        """Add one request and step until it finishes, yielding its outputs (single-consumer helper;
        other requests in the engine advance too)."""
        rid = self.add_request(prompt, params, lora)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:  # the consumer stopped early (closed the iterator, or raised): the request stops too
            self.abort(rid)
