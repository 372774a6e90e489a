#!/usr/bin/env bash
# Baseline vs DyCoke on the DyCoke paper's video tasks, with the stock lmms-eval (0.7.x) and this package's
# plugin; then one markdown table of scores and wall times (scripts/results_table.py).
#
#   bash eval.sh                                                     # 7B OV, 8 GPUs, all tasks
#   MODEL=lmms-lab/llava-onevision-qwen2-0.5b-ov NUM_GPUS=1 TASKS=videomme bash eval.sh
#   MODEL=lmms-lab/llava-onevision-qwen2-72b-ov NUM_GPUS=1 DEVICE_MAP=auto bash eval.sh   # 72B on one node
#   MODEL=lmms-lab/LLaVA-Video-7B-Qwen2 MODEL_TYPE=llava_vid EXTRA_MODEL_ARGS=max_frames_num=64 bash eval.sh
#
# Each (setting, task) is its own `accelerate launch` run, timed, written to $OUTPUT/<setting>/<task>/.
# activitynetqa and video_dc499 are scored by a GPT judge through the OpenAI API: without OPENAI_API_KEY
# they are skipped (with a notice before anything runs); the other tasks still run.
# lmms-eval exits 0 even when a run fails, so a run counts as done only if its launcher exited 0 and it wrote
# a results file; failed runs are listed at the end and the script exits 1.
# Before launching anything it checks that NUM_GPUS CUDA GPUs are visible (unless device=cpu is asked) and
# that a local MODEL exists. Relative MODEL, OUTPUT and INCLUDE_PATH are relative to the folder eval.sh is
# run from. CPU smoke test on a small local checkpoint: see docs/evaluation.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # this repository (scripts/results_table.py)
PYTHON="${PYTHON:-python}"

MODEL="${MODEL:-lmms-lab/llava-onevision-qwen2-7b-ov}"
MODEL_TYPE="${MODEL_TYPE:-llava_onevision}"        # llava_vid for LLaVA-Video checkpoints
CONV_TEMPLATE="${CONV_TEMPLATE:-qwen_1_5}"
NUM_GPUS="${NUM_GPUS:-8}"                          # data-parallel processes (one model copy each)
DEVICE_MAP="${DEVICE_MAP:-}"                       # "auto" with NUM_GPUS=1: one model split over all GPUs
DYCOKE_K="${DYCOKE_K:-0.7}"                        # temporal token merging ratio
DYCOKE_L="${DYCOKE_L:-3}"                          # KV pruning layer
DYCOKE_P="${DYCOKE_P:-0.7}"                        # KV pruning ratio
TASKS="${TASKS:-activitynetqa,video_dc499,perceptiontest_val_mc,videomme,videomme_w_subtitle,nextqa_mc_test}"
SETTINGS="${SETTINGS:-baseline,dycoke}"
OUTPUT="${OUTPUT:-./logs/eval}"
EXTRA_MODEL_ARGS="${EXTRA_MODEL_ARGS:-}"           # appended to both settings, e.g. max_frames_num=32
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"             # e.g. "--cpu"; without --main_process_port a free port is picked per run
LIMIT="${LIMIT:-}"                                 # samples per task, for a quick check
INCLUDE_PATH="${INCLUDE_PATH:-}"                   # folder of extra task yamls (lmms-eval --include_path)
GPT_JUDGE_TASKS=(activitynetqa video_dc499)
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"  # lmms-eval's task files read it unguarded

fail() {
    echo "eval.sh: $*" >&2
    exit 2
}

absolute() {  # a path relative to the folder eval.sh runs in -> absolute
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

looks_like_hub_id() {  # owner/name, not an existing path
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] && [ ! -e "$1" ]
}

model_args_for() {
    local args="pretrained=$MODEL,conv_template=$CONV_TEMPLATE,model_name=llava_qwen"
    [ -n "$DEVICE_MAP" ] && args+=",device_map=$DEVICE_MAP"
    case "$1" in
        baseline) ;;
        dycoke) args+=",dycoke=True,dycoke_k=$DYCOKE_K,dycoke_l=$DYCOKE_L,dycoke_p=$DYCOKE_P" ;;
        *) echo "eval.sh: unknown setting '$1' (known: baseline, dycoke)" >&2; exit 2 ;;
    esac
    [ -n "$EXTRA_MODEL_ARGS" ] && args+=",$EXTRA_MODEL_ARGS"
    echo "$args"
}

# Drop the GPT-judged tasks up front when no API key is set.
IFS=',' read -r -a task_list <<< "$TASKS"
if [ -z "${OPENAI_API_KEY:-}" ] || [ "${OPENAI_API_KEY}" = "YOUR_OPENAI_API_KEY" ]; then
    kept=()
    for task in "${task_list[@]}"; do
        if [[ " ${GPT_JUDGE_TASKS[*]} " == *" $task "* ]]; then
            echo "NOTICE: skipping $task: it is scored by a GPT judge (OpenAI API) and OPENAI_API_KEY is not set."
        else
            kept+=("$task")
        fi
    done
    task_list=("${kept[@]}")
    [ "${#task_list[@]}" -gt 0 ] || { echo "eval.sh: no task left to run." >&2; exit 1; }
else
    echo "GPT-judged tasks use OPENAI_API_KEY with judge model ${MODEL_VERSION:-gpt-4o-2024-11-20} (set MODEL_VERSION to change it)."
fi
IFS=',' read -r -a setting_list <<< "$SETTINGS"
for setting in "${setting_list[@]}"; do model_args_for "$setting" > /dev/null; done

# -- checks before any launch: each would otherwise fail the same way, once per (setting, task) ----------
wants_cpu() {  # device=cpu or device_map=cpu in the model args, or accelerate's --cpu
    [[ ",$(model_args_for "${setting_list[0]}")," =~ ,device(_map)?=cpu, ]] || [[ " $ACCELERATE_ARGS " == *" --cpu "* ]]
}

check_devices() {
    [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fail "NUM_GPUS=$NUM_GPUS must be a positive number of processes."
    if wants_cpu; then
        [ "$NUM_GPUS" = 1 ] || fail "device=cpu runs in one process: set NUM_GPUS=1 (it is $NUM_GPUS)."
        return
    fi
    local visible
    visible="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')" \
        || fail "cannot import torch with $PYTHON: install this package first (bash scripts/install.sh)."
    if [ "$visible" -lt "$NUM_GPUS" ]; then
        local fix="set NUM_GPUS=$visible"
        [ "$visible" -gt 0 ] || fix="run where CUDA GPUs are visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        fail "NUM_GPUS=$NUM_GPUS but $PYTHON sees $visible CUDA GPU(s) (torch.cuda). Either $fix, or run on the CPU" \
            "(small checkpoints only): NUM_GPUS=1 EXTRA_MODEL_ARGS=device=cpu ACCELERATE_ARGS=--cpu bash eval.sh."
    fi
}

check_model() {
    if [ -e "$MODEL" ]; then
        [ -f "$MODEL/config.json" ] || fail "MODEL=$MODEL is not a checkpoint folder (no config.json in $(absolute "$MODEL"))."
        MODEL="$(absolute "$MODEL")"
    elif ! looks_like_hub_id "$MODEL"; then
        fail "MODEL=$MODEL does not exist (relative paths are relative to $PWD) and is not a hub id (owner/name)."
    fi
}

command -v accelerate > /dev/null || fail "the accelerate command is not on PATH: install this package (bash scripts/install.sh)."
check_devices
check_model
OUTPUT="$(absolute "$OUTPUT")"
if [ -n "$INCLUDE_PATH" ]; then
    [ -d "$INCLUDE_PATH" ] || fail "INCLUDE_PATH=$INCLUDE_PATH is not a folder (relative paths are relative to $PWD)."
    INCLUDE_PATH="$(absolute "$INCLUDE_PATH")"
fi

free_port() {  # for the processes of one run to meet; a fixed port would collide between concurrent runs
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "Model $MODEL ($MODEL_TYPE), $NUM_GPUS process(es); settings: ${setting_list[*]}; tasks: ${task_list[*]}; output: $OUTPUT"
failed=()
for setting in "${setting_list[@]}"; do
    for task in "${task_list[@]}"; do
        out="$OUTPUT/$setting/$task"
        mkdir -p "$out"
        touch "$out/.started"
        port_args=()
        [[ "$ACCELERATE_ARGS" == *--main_process_port* ]] || port_args=(--main_process_port="$(free_port)")
        # shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of words
        cmd=(accelerate launch --num_processes="$NUM_GPUS" "${port_args[@]}" $ACCELERATE_ARGS -m lmms_eval
             --model "$MODEL_TYPE" --model_args "$(model_args_for "$setting")" --tasks "$task"
             --batch_size 1 --log_samples --log_samples_suffix "$MODEL_TYPE" --output_path "$out")
        [ -n "$LIMIT" ] && cmd+=(--limit "$LIMIT")
        [ -n "$INCLUDE_PATH" ] && cmd+=(--include_path "$INCLUDE_PATH")
        echo "=== $setting / $task"
        echo "+ ${cmd[*]}"
        start=$SECONDS
        status=0
        "${cmd[@]}" 2>&1 | tee "$out/run.log" || status=$?
        elapsed=$((SECONDS - start))
        if [ "$status" -ne 0 ]; then
            failed+=("$setting/$task (exit status $status)")
            echo "=== $setting / $task: FAILED after ${elapsed}s: the launcher exited with status $status (see $out/run.log)"
        elif [ -z "$(find "$out" -name '*_results.json' -newer "$out/.started" -print -quit)" ]; then
            failed+=("$setting/$task (no results file)")
            echo "=== $setting / $task: FAILED after ${elapsed}s: no results file (see $out/run.log)"
        else
            echo "$elapsed" > "$out/wall_time_s"
            echo "=== $setting / $task: done in ${elapsed}s"
        fi
    done
done

echo
"$PYTHON" "$ROOT/scripts/results_table.py" "$OUTPUT" --settings "$SETTINGS" | tee "$OUTPUT/results.md" || true
if [ "${#failed[@]}" -gt 0 ]; then
    echo "Failed runs:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
