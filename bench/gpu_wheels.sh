#!/usr/bin/env bash
# Install carried wheels on the GPU machine, joining the ones that travelled split.
#
#   bash bench/gpu_wheels.sh DIR [DIR ...] TARGET      e.g.  bash bench/gpu_wheels.sh .whl /tmp/site
#   export PYTHONPATH=TARGET:TARGET/nvidia_cutlass_dsl/dsl_packages
#
# A wheel over one transfer's size travels as `split -b 50M X.whl X.whl.part-` pieces (X.whl.part-aa, -ab, ...),
# possibly in different DIRs carried by different calls; they are joined (in name order) into a scratch folder and
# checked as zip files before pip sees them. The second PYTHONPATH entry is needed because pip --target does not
# run nvidia-cutlass-dsl's .pth file, which is what puts its `cutlass` package on the path.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: bash bench/gpu_wheels.sh DIR [DIR ...] TARGET" >&2
    exit 2
fi
target="${!#}"
dirs=("${@:1:$#-1}")
joined="$(mktemp -d /tmp/gpu_wheels.XXXXXX)"
wheels=()

for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || { echo "gpu_wheels.sh: $dir is not a folder (carry it with the call)" >&2; exit 1; }
    for whl in "$dir"/*.whl; do
        [ -e "$whl" ] && wheels+=("$whl")
    done
done

# Every split wheel, by name, from all DIRs: X.whl.part-aa in one folder and X.whl.part-ab in another join.
mapfile -t split_names < <(find "${dirs[@]}" -maxdepth 1 -name '*.whl.part-*' -printf '%f\n' |
                           sed 's/\.part-[a-z]*$//' | sort -u)
for name in "${split_names[@]}"; do
    # in part order (aa, ab, ...) whichever folder each part is in
    mapfile -t parts < <(find "${dirs[@]}" -maxdepth 1 -name "$name.part-*" -printf '%f\t%p\n' | sort | cut -f2)
    cat "${parts[@]}" > "$joined/$name"
    if ! python3 -m zipfile -t "$joined/$name" > /dev/null 2>&1; then
        echo "gpu_wheels.sh: $name joined from ${#parts[@]} part(s) is not a whole zip: a part is missing" \
             "(carry every $name.part-* file; the machine keeps earlier calls' files only while it stays warm)" >&2
        exit 1
    fi
    echo "joined $name from ${#parts[@]} part(s), $(stat -c %s "$joined/$name") bytes" >&2
    wheels+=("$joined/$name")
done

[ "${#wheels[@]}" -gt 0 ] || { echo "gpu_wheels.sh: no wheels in ${dirs[*]}" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${wheels[@]}"
rm -rf "$joined"
echo "installed ${#wheels[@]} wheel(s) into $target; now: export PYTHONPATH=$target:$target/nvidia_cutlass_dsl/dsl_packages" >&2
