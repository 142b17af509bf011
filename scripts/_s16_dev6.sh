export PYTHONPATH=. FLASHCORE_GIT_COMMIT=7928570
L=$OUT/s16dev6; mkdir -p $L
timeout 130 python -m pytest tests/test_hopper.py -n 14 -q -p no:cacheprovider -k "4k or 3ok or graph_capture or prepared" 2>&1 | grep -v Warning | tail -6 | tee $L/gpu-tests.log
for r in 1 2 3; do
  left=$((585 - SECONDS)); [ $left -lt 90 ] && break
  timeout $left python -m flashcore.cli bench --suite all --providers sdpa flashcore-triton --out $L/suite --tag all-s16-run$r --plot > $L/suite-run$r.log 2>&1
  echo "run $r rc $? at ${SECONDS}s" | tee -a $L/runs.txt
done
cd $OUT && tar czf s16dev6.tgz s16dev6
