#!/usr/bin/env bash
# bunny-llama-3-8b-v: the published last step ("Weight Merging" in https://github.com/BAAI-DCAI/Bunny/blob/main/script/train/tutorials/Bunny-Llama-3-8B-V.md):
# merge each recipe's LoRA into the base LLM, then average the two models linearly,
# 0.5 x recipe-1 + 0.5 x recipe-2 (the weights the authors chose empirically). The result keeps recipe-2's config, as the tutorial copies
# recipe-2's folder before averaging: `bunny average` keeps the first model's config, so recipe-2 comes first.
# `bunny average` merges a LoRA run into its base itself (`bunny merge` does that step on its own).
set -euo pipefail
bunny average runs/bunny-llama-3-8b-v-finetune-recipe2 runs/bunny-llama-3-8b-v-finetune-recipe1 \
  --weights 0.5 0.5 --out runs/bunny-llama-3-8b-v
