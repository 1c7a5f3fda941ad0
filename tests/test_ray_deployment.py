"""Deployments on a Ray cluster (backend="ray"): a local Ray instance of 2 CPUs and
no GPU, started once for the module; replicas of the tiny llama as Ray Serve
replicas, answering token for token as the pipeline does, spread over, restarted
by Ray, autoscaled, and removed without a trace."""

from __future__ import annotations

import os
import socket

import httpx
import pytest
import ray

import mii
from helpers import PROMPTS
from mii.rpc import registry
from mii.rpc.deployment import free_port

GREEDY = {"do_sample": False, "max_new_tokens": 12}
SLOW_PASS_S = "0.05"  # MII_PASS_DELAY_S: requests that overlap, whatever the machine


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    return registry.pid_alive(pid)


def serve_actors() -> list[str]:
    """Named actors of Ray Serve and of mii on the cluster."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] in ("serve", "mii")
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance (2 CPUs, no GPU) shared by the module; its address."""
    context = ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, namespace="mii-tests")
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mii-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def reference(checkpoints):
    with mii.pipeline(str(checkpoints("llama")[0])) as pipe:
        return {p: pipe(p, **GREEDY)[0] for p in PROMPTS}


def start(cluster, model: str, pass_delay: str = "0", **options):
    """``mii.serve`` on the test cluster, REST on, on free ports; (client, name, url)."""
    name = f"ray-{os.urandom(4).hex()}"
    rest_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_PASS_DELAY_S", pass_delay)
        client = mii.serve(
            model,
            deployment_name=name,
            ray_address=cluster,
            ray_num_cpus=0.5,
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=free_port(),
            startup_timeout=240,
            **options,
        )
    return client, name, f"http://127.0.0.1:{rest_port}"


@pytest.fixture(scope="module")
def two(cluster, cache_dir, checkpoints):
    client, name, url = start(cluster, str(checkpoints("llama")[0]), SLOW_PASS_S, replica_num=2)
    yield client, name, url
    if registry.lookup(name) is not None:
        client.terminate_server()


def test_two_replicas_answer_as_the_pipeline(two, reference):
    client, name, url = two
    client = mii.client(name)  # found by name, as any deployment
    answers = client.generate(PROMPTS, **GREEDY)
    assert [a.token_ids for a in answers] == [reference[p].token_ids for p in PROMPTS]
    assert [a.generated_text for a in answers] == [reference[p].generated_text for p in PROMPTS]
    streamed = "".join(p.generated_text for p in client.stream(PROMPTS[1], **GREEDY))
    assert streamed == reference[PROMPTS[1]].generated_text
    # The HTTP routes through Ray Serve's ingress: /mii/{name} and the OpenAI API.
    reply = httpx.post(f"{url}/mii/{name}", json={"prompts": PROMPTS[:2], **GREEDY}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert [r["generated_text"] for r in reply.json()] == [
        reference[p].generated_text for p in PROMPTS[:2]
    ]
    import openai

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    completion = oai.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert completion.choices[0].text == reference[PROMPTS[0]].generated_text
    chunks = oai.completions.create(
        model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == reference[PROMPTS[0]].generated_text
    # Bad input: the same 400 naming the field as on a single host, over both protocols.
    bad = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "top_p": 7})
    assert bad.status_code == 400 and "top_p" in bad.text
    with pytest.raises(mii.InvalidRequestError) as err:
        client.generate("x", max_new_tokens=-3)
    assert err.value.field == "max_new_tokens"
