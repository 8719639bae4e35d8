"""A real vLLM ``Scheduler`` with ``OffloadingConnector`` -> ``TieringOffloadingSpec`` -> kvtier's
tier, on CPU with a tiny local model config (no weights, no tokenizer, no downloads).

vLLM's GPU worker cannot run here, so ``CpuWorker`` stands in for it: it completes each step's
transfer jobs at once (stores write a pattern into the CPU tier's rows, as a GPU->CPU copy
would) and reports them back exactly as vLLM's ``OffloadingConnectorWorker`` does.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16  # tokens per vLLM block
EOS = 2
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": EOS}


def write_tiny_model(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(directory)


def model_config(model_dir: str) -> ModelConfig:
    """The slow part (vLLM inspects the architecture in a subprocess): build once, reuse."""
    return ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float16", seed=0,
                       max_model_len=4096)


def tier_config(**kw: Any) -> dict:
    return {"type": "KVTierSecondaryTier", "module_path": "kvtier.integrations.vllm",
            "min_free": 0, "direct_io": False, **kw}


def vllm_config(mc: ModelConfig, tier: dict, *, cache_dtype: str = "auto") -> VllmConfig:
    sc = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=2048, max_model_len=4096,
                         enable_chunked_prefill=True, is_encoder_decoder=False)
    cc = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype=cache_dtype,
                     enable_prefix_caching=True)
    cc.kv_cache_layout = "LBNHC"
    kvt = KVTransferConfig(
        kv_connector="OffloadingConnector", kv_role="kv_both", engine_id=uuid.uuid4().hex,
        kv_connector_extra_config={"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8 << 20,
                                   "block_size": BLOCK, "secondary_tiers": [tier]})
    return VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc, kv_transfer_config=kvt,
                      device_config=DeviceConfig("cpu"))


class Engine:
    """A scheduler plus a stand-in worker; ``run`` serves one request to completion and returns
    the external hit tokens the connector granted it."""

    def __init__(self, config: VllmConfig, num_blocks: int = 512) -> None:
        init_none_hash(sha256)
        dtype = torch.float16 if config.cache_config.cache_dtype == "auto" else torch.uint8
        kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=2,
                                                          head_size=16, dtype=dtype))])
        config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=config, kv_cache_config=kcc, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(config),
                                   block_size=BLOCK)
        self.connector = self.scheduler.connector
        self.manager = self.connector.connector_scheduler.manager
        self.tier = self.manager.secondary_tiers[0]
        self._hasher = get_request_block_hasher(BLOCK, sha256)
        self._ext: dict[str, int] = {}
        real = self.connector.get_num_new_matched_tokens

        def spy(request: Request, num_computed: int):
            n, is_async = real(request, num_computed)
            if n is not None:
                self._ext[request.request_id] = n
            return n, is_async

        self.connector.get_num_new_matched_tokens = spy
        self._next = 0

    def run(self, prompt: list[int], *, cache_salt: str | None = None, timeout_s: float = 60) -> int:
        self._next += 1
        rid = f"r{self._next}"
        params = SamplingParams(max_tokens=1)
        params.update_from_generation_config({}, EOS)
        req = Request(request_id=rid, prompt_token_ids=prompt, sampling_params=params,
                      pooling_params=None, cache_salt=cache_salt, block_hasher=self._hasher)
        self.scheduler.add_request(req)
        deadline = time.monotonic() + timeout_s
        while self.scheduler.requests or self.scheduler.has_requests() or self.tier.has_pending_work():
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {rid} did not finish in {timeout_s}s")
            out = self.scheduler.schedule()
            self.scheduler.update_from_output(out, self._work(out))
            if out.total_num_scheduled_tokens == 0:
                time.sleep(0.005)  # a lookup or transfer in flight on kvtier's threads
        return self._ext.get(rid, 0)

    def _work(self, out) -> ModelRunnerOutput:
        meta = out.kv_connector_metadata
        done: dict[int, int] = {}
        recv: set[str] = set()
        for jid, job in meta.store_jobs.items():  # GPU -> CPU: write what a GPU block would hold
            for c in job.dst_spec.block_ids:
                self.tier._rows[int(c)].fill_(int(c) % 251)
            done[jid] = 1
        for jid, job in meta.load_jobs.items():  # CPU -> GPU
            done[jid] = 1
            if not job.sync:
                recv.add(job.req_id)
        reqs = [r.request_id for r in self.scheduler.running]
        return ModelRunnerOutput(
            req_ids=reqs, req_id_to_index={r: i for i, r in enumerate(reqs)},
            sampled_token_ids=[[EOS] for _ in reqs], logprobs=None, prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=KVConnectorOutput(
                finished_sending=set(), finished_recving=recv, invalid_block_ids=set(),
                kv_connector_worker_meta=OffloadingWorkerMetadata(completed_jobs=done)))

    def drain(self) -> None:
        """Let every store reach kvtier (as a running engine would between requests)."""
        self.tier.drain_jobs()
        with self.manager.lock:
            self.manager._process_finished_jobs()

    def shutdown(self) -> None:
        self.drain()
        self.connector.shutdown()
