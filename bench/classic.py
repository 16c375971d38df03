"""Kaito-classic baseline server for `bench/serving.py --classic`: what Kaito's HF runtime was.

FastAPI with a sync /chat endpoint calling one `transformers.pipeline("text-generation")` per request
(no batching, no streaming): a client's first token arrives with the whole answer.
"""

from __future__ import annotations

import argparse
import os


def serve(model_dir: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.set_num_threads(int(os.environ.get("KAITO_TORCH_THREADS", "0")) or torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "Healthy"}

    @app.post("/chat")
    def chat(body: dict):
        kw = {**body.get("generate_kwargs", {}), "pad_token_id": tok.eos_token_id}
        out = pipe(body["prompt"], **kw)
        return {"Result": "".join(o["generated_text"] for o in out)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    serve(a.model_dir, a.port)
