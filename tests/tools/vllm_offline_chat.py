"""Reference answer: vLLM's own offline ``LLM.chat`` on a model directory, printed as JSON.

Run as a script (vLLM's engine starts child processes, which re-import ``__main__``):
    python -m tests.tools.vllm_offline_chat MODEL_DIR REQUEST_JSON
where REQUEST_JSON holds ``{"messages", "max_tokens", "dtype", "max_model_len"}``.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model_dir, request = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=model_dir, dtype=request["dtype"], max_model_len=request["max_model_len"], enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=request["max_tokens"])
    output = llm.chat(request["messages"], params)[0].outputs[0]
    print("RESULT " + json.dumps({"text": output.text, "token_ids": list(output.token_ids)}), flush=True)


if __name__ == "__main__":
    main()
