#!/usr/bin/env bash
# bunny-v1.0-4b: the published last step ("Weight Merging" in https://github.com/BAAI-DCAI/Bunny/blob/main/script/train/tutorials/Bunny-v1.0-4B.md):
# merge each recipe's LoRA into the base LLM, then average the two models linearly,
# 0.3 x recipe-1 + 0.7 x recipe-2 (the weights the authors chose empirically). The result keeps recipe-2's config, as the tutorial copies
# recipe-2's folder before averaging: `bunny average` keeps the first model's config, so recipe-2 comes first.
# `bunny average` merges a LoRA run into its base itself (`bunny merge` does that step on its own).
set -euo pipefail
bunny average runs/bunny-v1.0-4b-finetune-recipe2 runs/bunny-v1.0-4b-finetune-recipe1 \
  --weights 0.7 0.3 --out runs/bunny-v1.0-4b
