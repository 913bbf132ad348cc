"""Fleets that generate, for tests: tiny models drawn wide enough to say something, the whole model's reference,
the stages served in-process (`LocalStages`), and the real processes (`Fleet`: a worker, node agents, a model
server, ``williw serve-api``).

`LocalStages` runs what a node agent runs for generation, without the agent: one `williw.serve.ShardServer` per
node with its `williw.node_stages.StageService`, shards written into each node's data folder in the agents'
layout, the plan and the KV budget answered by the test instead of a worker. A `williw.pipeline.Pipeline` over it
is the real one, HTTP included, so a test can see what a caller sees, and can change the nodes under a running
generation (drop a version, as an agent does once a re-plan is in force).

torch and transformers are imported inside the functions, as in the library.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx

from workerproc import VENV_BIN, WorkerProcess, free_port, stop_processes, wait_for

EOS = 256
VOCAB = 257  # 256 byte tokens and </s>: every id the model gives decodes
# The default initializer_range (0.02) gives weights so narrow that greedy decoding of a tiny model settles into a
# cycle of one or two tokens within 16 steps (a 4-block Llama here: 227, 71, 227, 71, ...); at 0.3 the 6-block
# Llama, Mistral and Gemma 3 gave 22, 22 and 17 distinct tokens in 24, so a pipeline that loses its context cannot
# match the reference by chance.
WIDE = 0.3
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_model(path: Path, family: str = "llama", *, layers: int = 6, **overrides: Any) -> Path:
    """A tiny model of ``family`` (`williw.tinymodels.build_family`), weights drawn at `WIDE`, byte-level vocabulary
    and tokenizer with a chat template (`byte_tokenizer`)."""
    from williw import tinymodels

    tinymodels.build_family(path, family, layers=layers, tie=False, initializer_range=WIDE, vocab_size=VOCAB,
                            eos_token_id=EOS, bos_token_id=None, pad_token_id=None, **overrides)
    byte_tokenizer(path)
    return path


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (256 byte tokens, no merges), ``</s>`` = 256 and `CHAT_TEMPLATE`, saved the
    transformers way."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                         chat_template=CHAT_TEMPLATE).save_pretrained(path)


def load_whole(model: Path) -> Any:
    """The whole model, float32, as transformers loads it."""
    import torch
    import transformers

    from williw.progress import quiet_transformers

    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


class WholeSession:
    """The whole model run as a node's session runs it, so that its logits are the stages' bit for bit: a prefill,
    then a few tokens at a time on its own cache, the last position's logits only (``logits_to_keep=1``: a one-row
    product rounds differently from the whole prompt's), and its weights in 64-byte aligned memory as the stages'
    are (`williw.hfmodel.align`: from ``from_pretrained``'s unaligned memory, one-row products differed by about
    1e-5 after a few decode steps)."""

    def __init__(self, whole: Any) -> None:
        from transformers import DynamicCache

        from williw.hfmodel import align
        from williw.stages import cache_argument

        align(whole)
        self.whole, self.position = whole, 0
        self.kwargs = {cache_argument(whole): DynamicCache(config=whole.config), "use_cache": True,
                       "logits_to_keep": 1}

    def step(self, ids: list[int]) -> Any:
        """The next token's logits ``[1, vocab]`` after ``ids``, appended to what the session holds."""
        import torch

        positions = torch.arange(self.position, self.position + len(ids)).unsqueeze(0)
        self.position += len(ids)
        with torch.no_grad():
            return self.whole(torch.tensor([ids]), position_ids=positions, **self.kwargs).logits[:, -1, :].float()


def greedy_reference(whole: Any, ids: list[int], n: int) -> list[int]:
    """``model.generate``'s greedy tokens for ``ids`` (stopping at `EOS`, which it keeps)."""
    import torch

    out = whole.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def pipeline_plan(model: Path, cuts: list[int], node_ids: list[str], version: int = 1) -> Any:
    """The pipeline plan of ``version`` whose stages are cut at ``cuts``, on ``node_ids`` in stage order."""
    from williw.metadata import generate_metadata
    from williw.planner import pipeline_from_cuts

    return dataclasses.replace(pipeline_from_cuts(generate_metadata(model), cuts, node_ids), version=version)


def write_shard(model: Path, tensor_names: tuple[str, ...], folder: Path) -> Path:
    """A shard of ``model`` holding ``tensor_names``, with the model's config, in ``folder`` (written with
    safetensors itself: these tests are about serving, the splitter has tests of its own)."""
    from safetensors.torch import save_file

    from williw import tinymodels

    state = tinymodels.load_reference_state(model)
    folder.mkdir(parents=True)
    save_file({n: state[n].contiguous() for n in tensor_names}, folder / "model.safetensors")
    shutil.copy(model / "config.json", folder / "config.json")
    return folder


class LocalStages:
    """The stages of ``request_id``'s plan versions served from in-process node servers.

    Args:
        model: the model folder the shards are cut from.
        root: a folder for the nodes' data folders (``root/<node_id>``).
        batch_size, sequence_length: the request's KV budget, as the worker would answer it.
    """

    request_id = "0123456789abcdef0123456789abcdef"

    def __init__(self, model: Path, root: Path, *, batch_size: int = 1, sequence_length: int = 512) -> None:
        self.model, self.root = model, root
        self.request = {"request_id": self.request_id, "batch_size": batch_size, "sequence_length": sequence_length}
        self.plans: dict[int, Any] = {}
        self.servers: dict[str, Any] = {}
        self.pipelines: list[Any] = []  # closed with the servers

    def add_version(self, version: int, cuts: list[int], node_ids: list[str]) -> Any:
        """Plan ``version`` (stages cut at ``cuts`` on ``node_ids``), its shards on the nodes, each stage preloaded
        (as an agent does once its shard is ready) and waited for."""
        from williw.node_stages import StageService
        from williw.serve import ShardServer

        plan = self.plans[version] = pipeline_plan(self.model, cuts, node_ids, version)
        for a in plan.assignments:
            write_shard(self.model, a.tensor_names, self.shard_dir(a.node_id, version))
            if a.node_id not in self.servers:
                server = ShardServer(self.root / a.node_id, a.node_id)
                server.stages = StageService(self.root / a.node_id, a.node_id, self._plan_of, self._request_of,
                                             self._urls_of)
                self.servers[a.node_id] = server.start()
        for a in plan.assignments:
            self.servers[a.node_id].stages.preload(self.request_id, version)

        def settled() -> dict[str, dict[str, Any]] | None:
            states = {n: self.servers[n].stages.state(self.request_id, version) for n in node_ids}
            return states if all(s["state"] in ("loaded", "failed") for s in states.values()) else None

        states = wait_for(f"the stages of version {version}", settled, 60, 0.02)
        failed = {n: s["error"] for n, s in states.items() if s["state"] != "loaded"}
        assert not failed, f"stages that did not load: {failed}"
        return plan

    def shard_dir(self, node_id: str, version: int) -> Path:
        return self.root / node_id / self.request_id / f"v{version}" / node_id

    def drop(self, node_id: str, version: int) -> None:
        """What an agent does to a superseded version: free its stage and delete its shard."""
        later = max(self.plans)
        self.servers[node_id].stages.drop_except(self.request_id, later)
        shutil.rmtree(self.shard_dir(node_id, version))

    def pipeline(self, version: int, *, chained: bool = True) -> Any:
        """The `williw.pipeline.Pipeline` of ``version``, as `Pipeline.from_worker` would give it."""
        from williw.pipeline import CONNECT_TIMEOUT_S, Hop, Pipeline

        hops = tuple(Hop(a.node_id, self.servers[a.node_id].url.rstrip("/"), a.blocks)
                     for a in self.plans[version].assignments)
        http = httpx.Client(timeout=httpx.Timeout(60.0, connect=CONNECT_TIMEOUT_S), trust_env=False)
        self.pipelines.append(Pipeline(self.request_id, version, hops, http, chained))
        return self.pipelines[-1]

    def sessions(self, node_id: str, version: int) -> int:
        """How many sessions the node's stage of ``version`` holds (0 when it holds no stage)."""
        future = self.servers[node_id].stages.hosts.get((self.request_id, version))
        return len(future.result().sessions) if future is not None else 0

    def close(self) -> None:
        for pipeline in self.pipelines:
            pipeline.close()
        stopping = [threading.Thread(target=s.shutdown) for s in self.servers.values()]  # 0.5 s each: at once
        for server, thread in zip(self.servers.values(), stopping, strict=True):
            server.stages.stopped = True
            thread.start()
        for server, thread in zip(self.servers.values(), stopping, strict=True):
            thread.join()
            server.server_close()

    def _plan_of(self, request_id: str, version: int) -> dict[str, Any]:
        return self.plans[version].to_dict()

    def _request_of(self, request_id: str) -> dict[str, Any]:
        return self.request

    def _urls_of(self, request_id: str) -> dict[str, str]:
        return {node_id: server.url for node_id, server in self.servers.items()}


class Fleet:
    """Real processes on loopback: a worker, one ``williw node`` agent per node, a model server for the agents to
    pull from; `start` plans and distributes one request and waits until every stage is loaded.

    Args:
        model: the model folder (with its tokenizer).
        root: a folder for the database, the logs and the agents' data.
        nodes: node id -> TFLOPS; every node declares ``memory_gb``.
        model_name, batch_size, sequence_length: the request.
    """

    def __init__(self, model: Path, root: Path, nodes: dict[str, float], memory_gb: float, *,
                 model_name: str = "t/tiny", batch_size: int = 1, sequence_length: int = 256) -> None:
        self.model, self.root, self.nodes, self.memory_gb = model, root, nodes, memory_gb
        self.model_name, self.batch_size, self.sequence_length = model_name, batch_size, sequence_length
        self.worker: WorkerProcess | None = None
        self.server: Any = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.api: subprocess.Popen[str] | None = None
        self.api_url = ""
        self.request_id = ""
        self.plan: dict[str, Any] = {}

    def start(self, *, serve_api: bool = False) -> Fleet:
        """Start everything, plan and distribute the request, wait for every stage to be loaded (and, with
        ``serve_api``, for ``williw serve-api`` to listen, started as soon as the shards are ready)."""
        from williw.client import WorkerClient
        from williw.metadata import generate_metadata
        from williw.serve import ModelServer

        self.worker = WorkerProcess(f"sqlite:///{self.root / 'worker.db'}", node_ttl=5.0,
                                    log_path=self.root / "worker.log").start()
        self.server = ModelServer(self.model).start()
        for node_id, tflops in self.nodes.items():
            self.agents[node_id] = subprocess.Popen(
                [str(VENV_BIN / "williw"), "node", "--worker", self.worker.url, "--node-id", node_id,
                 "--compute-tflops", str(tflops), "--memory-gb", str(self.memory_gb), "--data-dir",
                 str(self.root / node_id), "--heartbeat-s", "0.3", "--poll-s", "0.1"],
                stdout=open(self.root / f"{node_id}.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        with WorkerClient(self.worker.url) as c:
            wait_for("online nodes", lambda: len(c.list_nodes(online=True)) == len(self.nodes))
            self.request_id = c.create_request(self.model_name, batch_size=self.batch_size,
                                               sequence_length=self.sequence_length)["request_id"]
            meta = generate_metadata(self.model, model_name=self.model_name, batch_size=self.batch_size,
                                     sequence_length=self.sequence_length)
            self.plan = c.process(self.request_id, metadata=meta.to_dict())["plan"]
            c.distribute(self.request_id, self.server.url)
            wait_for("shards ready", lambda: all(a["state"] == "ready"
                                                 for a in c.request_assignments(self.request_id)["assignments"]))
            if serve_api:
                self._start_api()
            wait_for("stages loaded", lambda: set(self.stage_states(c).values()) == {"loaded"}, 120, 0.2)
        if serve_api:
            wait_for("serve-api listening", self._listening, 60, 0.2)
        return self

    def stage_states(self, c: Any) -> dict[str, str]:
        rows = c.request_assignments(self.request_id)["assignments"]
        return {r["node_id"]: httpx.get(f"{r['serve_url']}/stage/{self.request_id}/v1").json()["state"]
                for r in rows}

    def pipeline(self, *, chained: bool = True) -> Any:
        """The request's `williw.pipeline.Pipeline`, from the worker."""
        from williw.pipeline import Pipeline

        return Pipeline.from_worker(self.worker.url, self.request_id, chained=chained)

    def _start_api(self) -> None:
        port = free_port()
        self.api = subprocess.Popen([str(VENV_BIN / "williw"), "serve-api", "--worker", self.worker.url,
                                     "--request", self.request_id, "--port", str(port)],
                                    stdout=open(self.root / "serve-api.log", "w"),  # noqa: SIM115
                                    stderr=subprocess.STDOUT, text=True)
        self.api_url = f"http://127.0.0.1:{port}/v1"

    def _listening(self) -> bool:
        assert self.api is not None and self.api.poll() is None, (self.root / "serve-api.log").read_text()
        try:
            return httpx.get(f"{self.api_url}/models").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        stop_processes([p for p in (self.api, *self.agents.values()) if p is not None])
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.worker is not None:
            self.worker.stop()
