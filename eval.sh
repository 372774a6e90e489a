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
# lmms-eval exits 0 even when a run fails, so a run counts as done only if it wrote a results file;
# failed runs are listed at the end and the script exits 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

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
ACCELERATE_ARGS="${ACCELERATE_ARGS:---main_process_port=25001}"  # e.g. "--cpu" for a CPU smoke test
LIMIT="${LIMIT:-}"                                 # samples per task, for a quick check
INCLUDE_PATH="${INCLUDE_PATH:-}"                   # folder of extra task yamls (lmms-eval --include_path)
GPT_JUDGE_TASKS=(activitynetqa video_dc499)
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"  # lmms-eval's task files read it unguarded

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

echo "Model $MODEL ($MODEL_TYPE), $NUM_GPUS process(es); settings: ${setting_list[*]}; tasks: ${task_list[*]}; output: $OUTPUT"
failed=()
for setting in "${setting_list[@]}"; do
    for task in "${task_list[@]}"; do
        out="$OUTPUT/$setting/$task"
        mkdir -p "$out"
        touch "$out/.started"
        cmd=(accelerate launch --num_processes="$NUM_GPUS" $ACCELERATE_ARGS -m lmms_eval
             --model "$MODEL_TYPE" --model_args "$(model_args_for "$setting")" --tasks "$task"
             --batch_size 1 --log_samples --log_samples_suffix "$MODEL_TYPE" --output_path "$out")
        [ -n "$LIMIT" ] && cmd+=(--limit "$LIMIT")
        [ -n "$INCLUDE_PATH" ] && cmd+=(--include_path "$INCLUDE_PATH")
        echo "=== $setting / $task"
        echo "+ ${cmd[*]}"
        start=$SECONDS
        "${cmd[@]}" 2>&1 | tee "$out/run.log" || true
        elapsed=$((SECONDS - start))
        if [ -n "$(find "$out" -name '*_results.json' -newer "$out/.started" -print -quit)" ]; then
            echo "$elapsed" > "$out/wall_time_s"
            echo "=== $setting / $task: done in ${elapsed}s"
        else
            failed+=("$setting/$task")
            echo "=== $setting / $task: FAILED after ${elapsed}s (no results file; see $out/run.log)"
        fi
    done
done

echo
"${PYTHON:-python}" scripts/results_table.py "$OUTPUT" --settings "$SETTINGS" | tee "$OUTPUT/results.md" || true
if [ "${#failed[@]}" -gt 0 ]; then
    echo "Failed runs: ${failed[*]}" >&2
    exit 1
fi
