#!/bin/sh
# Entry point of the training image (Dockerfile.train). Everything comes from
# environment variables, so one env file drives a whole run:
#
#   (no argument) | all   train; then, when EXPORT=1, export in the same run
#   train                 python -m train only
#   export                python -m export only
#   help                  this text
#   anything else         run it as a command (e.g. `bash`, `python -m train --help`)
#
# train reads RECIPE, OUTPUT_DIR (default outputs/train), HUB_REPO, HF_TOKEN...
# export shares some names with train (OUTPUT_DIR, HUB_REPO), so here it reads:
#   ADAPTER    the adapter to export          (default: train's OUTPUT_DIR, recipe included)
#   EXPORT_DIR where the GGUF files go        (default: outputs/export)
#   GGUF_REPO  the Hub repo for the GGUF      (default: HUB_REPO + "-GGUF"; unset HUB_REPO: no push)
#   MERGED_REPO with MERGED=1, the merged model's repo (default: HUB_REPO + "-merged")
# Relative paths are under /data, the working directory. all and train first check
# that torch starts CUDA; when it does not, they exit 2 saying which driver or
# TORCH_CUDA build fixes it (RECIPE=demo, made for a CPU, is not checked).
set -eu

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
}

check_data_writable() {
    if ! [ -w . ]; then
        echo "error: $(pwd) is not writable by uid $(id -u): mount a folder you own and run with" \
             "--user \"\$(id -u):\$(id -g)\" (or chown it to uid $(id -u))" >&2
        exit 2
    fi
}

# Before anything is downloaded: an old driver or a missing --gpus all would
# otherwise surface later as an unrelated settings error or a CPU run.
check_cuda() {
    python -m train.cuda_check || exit $?
}

run_train() {
    python -m train "$@"
}

# Where train put its run and which Hub repo it pushed to, as train itself
# resolves them (environment, then ./.env, then the recipe, then defaults):
# recipes set their own OUTPUT_DIR. cuda=True only skips the GPU check, which
# is beside the point here. Sets train_dir and train_repo.
resolve_train_run() {
    resolved=$(python -c 'from train.settings import load_train_settings
s = load_train_settings(cuda=True)
print(s.output_dir)
print(s.hub_repo or "")' 2>/dev/null) || resolved=""
    if [ -n "$resolved" ]; then
        train_dir=$(echo "$resolved" | sed -n 1p)
        train_repo=$(echo "$resolved" | sed -n 2p)
    else
        train_dir=${OUTPUT_DIR:-outputs/train}
        train_repo=${HUB_REPO:-}
    fi
}

run_export() {
    resolve_train_run
    gguf_repo=${GGUF_REPO:-}
    if [ -z "$gguf_repo" ] && [ -n "$train_repo" ]; then
        gguf_repo="${train_repo}-GGUF"
    fi
    # The merged model's repo sits beside the adapter's, not under the GGUF repo's name.
    merged_repo=${MERGED_REPO:-}
    case "${MERGED:-false}" in
        1|true|True|TRUE|yes|on)
            if [ -z "$merged_repo" ] && [ -n "$train_repo" ] && [ -n "$gguf_repo" ]; then
                merged_repo="${train_repo}-merged"
            fi
            ;;
    esac
    ADAPTER=${ADAPTER:-$train_dir} OUTPUT_DIR=${EXPORT_DIR:-outputs/export} HUB_REPO=$gguf_repo \
        MERGED_REPO=$merged_repo python -m export "$@"
}

stage=${1:-all}
case "$stage" in
    all)
        [ "$#" -gt 0 ] && shift
        # A bad EXPORT is refused before hours of training, not after.
        case "${EXPORT:-0}" in
            1|true|yes) export_after=1 ;;
            0|false|no) export_after=0 ;;
            *)
                echo "error: EXPORT='${EXPORT}': use 1 to export the GGUF after training, 0 not to" >&2
                exit 2
                ;;
        esac
        check_data_writable
        check_cuda
        echo "loraship: train" >&2
        run_train "$@"
        if [ "$export_after" = 1 ]; then
            echo "loraship: export" >&2
            run_export
        fi
        ;;
    train)
        shift
        check_data_writable
        check_cuda
        run_train "$@"
        ;;
    export)
        shift
        check_data_writable
        run_export "$@"
        ;;
    help|-h|--help)
        usage
        ;;
    *)
        exec "$@"
        ;;
esac
