#!/usr/bin/env bash
# popyou's whole chain on the tiny preset: offline, on a CPU, in a few minutes.
# Random tiny stand-ins check the machinery end to end; the pictures are noise by design.
#   bash examples/quickstart.sh [WORK_DIR]        (default: ./quickstart)
set -euo pipefail
W="${1:-quickstart}"
mkdir -p "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
POPYOU="${POPYOU:-popyou}"
step() { printf '\n== %s\n' "$*"; }

step "1/8 gen-data: 48 Funko prompts -> tiny SDXL images"
$POPYOU gen-data --preset tiny --n 48 --shard-size 16 --out "$W/data"
step "2/8 caption: tiny BLIP-2 captions"
$POPYOU caption --data "$W/data" --preset tiny --out "$W/cap"
step "3/8 encode: SigLIP embeddings + VAR codes"
$POPYOU encode --data "$W/cap" --preset tiny --hflip --out "$W/enc"
step "4/8 finetune: a new 'funko' class row on the tiny VAR"
$POPYOU finetune --preset tiny --data "$W/enc" --max-steps 20 --out "$W/ft"
step "5/8 train-adapter --stage image"
$POPYOU train-adapter --preset tiny --stage image --var "$W/ft/model" --data "$W/enc" --max-steps 20 --out "$W/img"
step "6/8 train-adapter --stage text (warm start from the image stage)"
$POPYOU train-adapter --preset tiny --stage text --init "$W/img/pipeline" --data "$W/enc" --max-steps 20 --out "$W/txt"
step "7/8 sample: text -> image, and a beta sweep"
$POPYOU sample "a wizard funko pop" "a funko pop astronaut holding a guitar" --pipeline "$W/txt/pipeline" --n 2 --out "$W/samples"
$POPYOU sample "a wizard funko pop" --pipeline "$W/txt/pipeline" --beta-sweep 0:2.5:6 --out "$W/sweep"
step "8/8 eval: SigLIP score, FID/KID, held-out NLL, report"
$POPYOU eval --pipeline "$W/txt/pipeline" --n-prompts 8 --out "$W/eval"

cat <<DONE

Done. Where things are:
  data set (gen-data -> caption -> encode)  $W/data  $W/cap  $W/enc
  finetuned VAR (model folder)              $W/ft/model
  pipelines (image, text stage)             $W/img/pipeline  $W/txt/pipeline
  samples, grid, samples.jsonl              $W/samples
  beta sweep (labelled strip + MP4)         $W/sweep
  metrics and report                        $W/eval/metrics.json  $W/eval/report.html
DONE
