"""The official `openai` Python SDK against a live diffit-server (embedded Fashion-MNIST model).

    python tests/sdk/openai_images.py --bin target/debug/diffit-server

Starts the server on 127.0.0.1 with an API key, points the SDK at it, and checks what a user of
the SDK would try: prompts as sentences ("sneakers", "a photo of a red sneaker"), size="auto",
response_format="url" (data: URLs), output_format="jpeg" with its metadata, the typed errors, and
models.retrieve(id). Then a server with two models (the embedded one and the tiny test fixture):
models.list() lists both, each id generates its own images, an unknown id is a NotFoundError with
code model_not_found. Exits non-zero on the first failed check.
"""

import argparse
import base64
import os
import subprocess
import sys
import time
import urllib.request

import openai

KEY = "sdk-test-key"
PASSED = []


def check(cond, what):
    if not cond:
        print(f"FAIL  {what}", flush=True)
        raise SystemExit(1)
    PASSED.append(what)
    print(f"ok    {what}", flush=True)


def jpeg_comment(data):
    """The text of the first COM segment (markers before the scan)."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xFE:
            return data[at + 4:at + 2 + length].decode()
        if marker == 0xDA:
            break
        at += 2 + length
    return None


def start(binary, *extra):
    """`serve` on a free loopback port with an API key; (process, base URL) once it is ready."""
    proc = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
                             "--api-key", KEY, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "RUST_LOG": "warn"})
    base = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
    for _ in range(1200):
        try:
            if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                break
        except Exception:
            time.sleep(0.1)
    return proc, base


def two_models(binary):
    """Two models in one server, addressed by the SDK's `model`."""
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
    tiny = (f"tiny={os.path.join(fixtures, 'diffit_tiny_model.safetensors')},"
            f"vae={os.path.join(fixtures, 'vae_tiny_model.safetensors')}")
    proc, base = start(binary, "--model", "fashion=embedded", "--model", tiny)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list().data]
        check(ids == ["fashion", "tiny"], f"two models: models.list() -> {ids}")
        r = client.images.generate(model="fashion", prompt="sneakers", extra_body={"steps": 2, "seed": 5})
        check(r.data[0].revised_prompt == "Sneaker" and r.size == "32x32", "model='fashion': a 32x32 Sneaker")
        r = client.images.generate(model="tiny", prompt="class 3", n=2, extra_body={"steps": 2})
        check(len(r.data) == 2 and r.data[0].revised_prompt == "class 3" and r.size == "64x64",
              "model='tiny': two 64x64 images of class 3")
        check(client.models.retrieve("tiny").id == "tiny", "models.retrieve('tiny')")
        try:
            client.images.generate(model="dall-e-3", prompt="sneakers")
            check(False, "an unknown model is refused")
        except openai.NotFoundError as e:
            check(e.code == "model_not_found" and "'fashion', 'tiny'" in e.message,
                  f"model='dall-e-3': NotFoundError model_not_found listing the ids: {e.message[:80]!r}")
        try:
            client.images.generate(prompt="sneakers")
            check(False, "no model with two served is refused")
        except openai.BadRequestError as e:
            check(e.param == "model", "no model with two served: BadRequestError naming model")
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/diffit-server")
    a = ap.parse_args()
    t0 = time.monotonic()
    proc, base = start(a.bin)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        model_id = client.models.list().data[0].id
        m = client.models.retrieve(model_id)
        check(m.id == model_id and m.object == "model", f"models.retrieve({model_id!r})")
        try:
            client.models.retrieve("dall-e-3")
            check(False, "models.retrieve of an unknown id raises")
        except openai.NotFoundError as e:
            check(model_id in str(e), "models.retrieve of an unknown id: NotFoundError naming ours")

        for prompt, cls in [("sneakers", "Sneaker"), ("a photo of a red sneaker", "Sneaker"),
                            ("boots", "Ankle boot"), ("tshirt", "T-shirt/top")]:
            r = client.images.generate(model=model_id, prompt=prompt, extra_body={"steps": 2})
            check(r.data[0].revised_prompt == cls, f"prompt {prompt!r} -> {cls}")

        r = client.images.generate(prompt="sneakers", n=2, size="auto", response_format="url",
                                   output_format="jpeg", output_compression=85, quality="high",
                                   background="opaque", moderation="low", user="sdk-test",
                                   extra_body={"steps": 2, "seed": 11})
        check(len(r.data) == 2, "n=2 images")
        for i, img in enumerate(r.data):
            check(img.url.startswith("data:image/jpeg;base64,"), f"image {i}: a data: URL of a JPEG")
            jpeg = base64.b64decode(img.url.split(",", 1)[1])
            check(jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9", f"image {i}: a whole JPEG file")
            meta = jpeg_comment(jpeg) or ""
            check(f"seed: {11 + i}" in meta and "class_name: Sneaker" in meta,
                  f"image {i}: JPEG comment carries the metadata")
        check(r.output_format == "jpeg" and r.size == "32x32", "response says jpeg, 32x32")

        r = client.images.generate(prompt="bag", response_format="b64_json", output_format="webp",
                                   extra_body={"steps": 2})
        webp = base64.b64decode(r.data[0].b64_json)
        check(webp[:4] == b"RIFF" and webp[8:12] == b"WEBP" and b"XMP " in webp, "webp with an XMP chunk")

        for kwargs, err, param in [
            ({"prompt": "a dress and a coat"}, openai.BadRequestError, "prompt"),
            ({"prompt": "a golden retriever"}, openai.BadRequestError, "prompt"),
            ({"prompt": "bag", "background": "transparent"}, openai.UnprocessableEntityError, "background"),
            ({"prompt": "bag", "size": "1024x1024"}, openai.BadRequestError, "size"),
            ({"prompt": "bag", "output_format": "gif"}, openai.BadRequestError, "output_format"),
        ]:
            try:
                client.images.generate(**kwargs)
                check(False, f"{kwargs} is refused")
            except err as e:
                check(e.body.get("param") == param if isinstance(e.body, dict) else param in str(e),
                      f"{kwargs}: {err.__name__} naming {param}: {e.message[:90]!r}")

        bare = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        try:
            bare.images.generate(prompt="bag")
            check(False, "a wrong key is refused")
        except openai.AuthenticationError:
            check(True, "a wrong key: AuthenticationError")
    finally:
        proc.terminate()
        proc.wait(30)
    two_models(a.bin)
    print(f"{time.monotonic() - t0:.0f} s")
    print(f"{len(PASSED)} passed, 0 failed")


if __name__ == "__main__":
    sys.exit(main())
