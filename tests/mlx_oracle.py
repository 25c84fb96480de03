#!/usr/bin/env python3
"""mlx_lm as the oracle of wick's tests that need it at run time (f32, CPU; the model loaded as
mlx_lm.load loads it, its sanitize included).

Usage:
  mlx_oracle.py logits MODEL - IDS              print the logits of IDS (one forward pass) as JSON
  mlx_oracle.py greedy MODEL MAX_KV IDS N       print the N greedy tokens after IDS with a cache
                                                rotating at MAX_KV positions (--max-kv-size)
  mlx_oracle.py save MODEL FILE IDS       prefill IDS into MODEL's cache and save it as a
                                                prompt cache file (mlx_lm.cache_prompt's format)
  mlx_oracle.py continue MODEL FILE IDS N load the prompt cache FILE and print, as JSON, the
                                                N greedy tokens after IDS (mlx_lm.generate
                                                --prompt-cache-file)
(IDS comma-separated.)
"""
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.utils import load_model


def main():
    mode, model_dir, path, ids = sys.argv[1], sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(",")]
    mx.set_default_device(mx.cpu)
    model, _ = load_model(Path(model_dir))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    if mode == "logits":
        print(json.dumps(model(mx.array(ids)[None])[0].tolist()))
    elif mode == "greedy":
        cache = make_prompt_cache(model, max_kv_size=int(path))
        out = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=int(sys.argv[5]), prompt_cache=cache)]
        print(json.dumps(out))
    elif mode == "save":
        cache = make_prompt_cache(model)
        for _ in generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache):
            pass
        save_prompt_cache(path, cache, {"model": model_dir})
    else:
        cache = load_prompt_cache(path)
        out = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=int(sys.argv[5]), prompt_cache=cache)]
        print(json.dumps(out))


if __name__ == "__main__":
    main()
