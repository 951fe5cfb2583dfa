# A pool of background jobs, sourced by compare.sh and converge.sh:
#
#   pool_add PID MAX   # PID has started; waits (oldest first) until fewer than MAX jobs run
#   pool_wait          # waits for every job left
#
# A job that fails stops the sourcing script (set -e) once it is waited for.
pool=()

pool_add() {
    pool+=("$1")
    while [ "${#pool[@]}" -ge "$2" ]; do wait "${pool[0]}"; pool=("${pool[@]:1}"); done
}

pool_wait() {
    local p
    for p in ${pool[@]+"${pool[@]}"}; do wait "$p"; done
    pool=()
}
