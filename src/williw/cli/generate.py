"""``williw generate`` (text through the node stages, streamed) and ``williw serve-api`` (an OpenAI-compatible
API over the same pipeline)."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode

_worker = click.option("--worker", "worker_url", envvar="WORKER_URL", required=True,
                       help="The worker's URL (WORKER_URL).")
_request = click.option("--request", "request_id", required=True, help="The request whose plan in force to run.")
_token = click.option("--token", envvar="WILLIW_TOKEN", help="The worker's admin token (WILLIW_TOKEN).")


@cli.command("generate")
@_worker
@_request
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1, 32768), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True,
              help="0: greedy (the most likely token); above 0: sampled from softmax(logits / T).")
# torch.Generator.manual_seed takes an int64 or a uint64 (williw.generation.SEED_MIN, SEED_MAX)
@click.option("--seed", type=click.IntRange(-(2**63), 2**64 - 1), help="Seed of the sampler (with --temperature > 0).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the model's chat template.")
@_token
@json_option
def generate_cmd(worker_url: str, request_id: str, prompt: str, max_new_tokens: int, temperature: float,
                 seed: int | None, chat: bool, token: str | None, as_json: bool) -> None:
    """Generate from PROMPT through the node stages in plan order, streaming tokens as they come.

    At most the context left after the prompt (the request's sequence_length) is generated: asked for more, it
    stops there with finish reason "length" and keeps the text.
    """
    import sys

    set_json_mode(as_json)
    from williw.generation import Generator, Stats

    gen = Generator(worker_url, request_id, token)
    ids = gen.prompt_ids(messages=[{"role": "user", "content": prompt}]) if chat else gen.prompt_ids(prompt)
    stats = Stats()
    parts = []
    for delta in gen.stream(ids, stats, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed):
        parts.append(delta)
        if not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    line = (f"{stats.new_tokens} tokens on plan version {stats.version} ({' → '.join(stats.nodes)}): prefill "
            f"{stats.prompt_tokens} tokens in {stats.prefill_s:.3f} s ({stats.prefill_tokens_per_s:.1f} tokens/s), "
            f"decode {stats.decode_tokens_per_s:.1f} tokens/s")
    if stats.finish_reason == "length" and stats.new_tokens < max_new_tokens:
        line += f"; stopped at the context of {gen.context_tokens} tokens (the request's sequence_length)"
    if as_json:
        emit(True, {"text": "".join(parts), **stats.to_dict()}, "")
    else:
        click.echo("")
        click.echo(line, err=True)


@cli.command("serve-api")
@_worker
@_request
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", help="The model id the API lists (default: the request's model).")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(1, 32768), default=64, show_default=True,
              help="Tokens generated when a call does not say.")
@_token
@json_option
def serve_api_cmd(worker_url: str, request_id: str, host: str, port: int, model_name: str | None,
                  default_max_tokens: int, token: str | None, as_json: bool) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) over the node stages."""
    set_json_mode(as_json)
    import uvicorn

    from williw.client import WorkerClient
    from williw.generation import Generator
    from williw.openai_api import create_app

    if model_name is None:
        with WorkerClient(worker_url, token) as c:
            model_name = c.get_request(request_id)["model_name"]
    gen = Generator(worker_url, request_id, token)
    _ = gen.tokenizer  # fail now, in one line, if the pipeline is not ready
    emit(as_json, {"url": f"http://{host}:{port}/v1", "model": model_name, "request_id": request_id},
         f"serving {model_name} at http://{host}:{port}/v1 (Ctrl-C to stop)")
    uvicorn.run(create_app(gen, model_name, default_max_tokens), host=host, port=port, log_level="warning")
