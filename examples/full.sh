#!/usr/bin/env bash
# popyou's whole chain with the real models on GPUs (the PopYOU recipe). Not run in CI: it needs the Hub once
# (or a filled Hugging Face cache), GPUs, and about a day on 8 GPUs. Every step resumes if killed: rerun it.
#   bash examples/full.sh [WORK_DIR] [NUM_GPUS]
set -euo pipefail
W="${1:-runs/funko}"
G="${2:-8}"
L=(accelerate launch --num_processes "$G" -m popyou_cli --)
mkdir -p "$W"

# 1. ~100k SDXL-Turbo images of generated Funko prompts, 512 px, 1 step, guidance 0 (~25 images/s per H100 target)
"${L[@]}" gen-data --n 100000 --preset full --batch-size 16 --dtype fp16 --out "$W/data"
# 2. BLIP-2 OPT-2.7b captions
"${L[@]}" caption --data "$W/data" --preset full --out "$W/cap"
# 3. SigLIP (ViT-B-16-SigLIP, webli) image + text embeddings and VAR-d16 codes (256 px), with mirrored codes
"${L[@]}" encode --data "$W/cap" --preset full --hflip --out "$W/enc"
# 4. VAR-d16 + a new "funko" class row: the original's lr 3e-4, batch 4 x accumulation 2 per GPU, label smoothing
#    0.1, 8% warm-up then linear decay, grad clip 1, fp16
"${L[@]}" finetune --preset full --var FoundationVision/var/var_d16.pth --data "$W/enc" --out "$W/ft"
# 5. stage 2: SigLIP image embeddings -> adapter -> cond_delta, VAR frozen with a LoRA (r 8, alpha 32)
"${L[@]}" train-adapter --preset full --stage image --var "$W/ft/model" --lora --data "$W/enc" --out "$W/img"
# 6. stage 3: the same adapter on SigLIP text embeddings of the prompts
"${L[@]}" train-adapter --preset full --stage text --init "$W/img/pipeline" --data "$W/enc" --out "$W/txt"
# 7. pictures
popyou sample "a wizard funko pop" "a funko pop astronaut holding a guitar" --pipeline "$W/txt/pipeline" --n 8 --out "$W/samples"
popyou sample "a wizard funko pop" --pipeline "$W/txt/pipeline" --beta-sweep 0:2.5:11 --out "$W/sweep"
# 8. numbers: 1000 held-out prompts, FID/KID vs the training images, SigLIP score, held-out NLL
popyou eval --pipeline "$W/txt/pipeline" --n-prompts 1000 --batch-size 32 --out "$W/eval"
echo "report: $W/eval/report.html"
