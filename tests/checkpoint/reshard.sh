#!/usr/bin/env bash
# Resharding: the training state saved on N ranks loads bit-identically on every other M
# (N, M in 1..4), across FSDP, hybrid-sharded and replicated layouts and with tied embeddings; async saves
# write the same bytes as sync ones. Runs tests/checkpoint/reshard_main.cpp under mpirun.
set -euo pipefail
: "${RESHARD_BIN:?}" "${MPIEXEC:?}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mpi() { local n=$1; shift; "$MPIEXEC" --oversubscribe -np "$n" "$RESHARD_BIN" "$@"; }

for n in 1 2 3 4; do mpi "$n" save "$work/fsdp$n" fsdp; done
for n in 1 2 3 4; do
  for m in 1 2 3 4; do
    [ "$n" = "$m" ] && continue
    mpi "$m" load "$work/fsdp$n" fsdp
  done
done
# Replicated data parallel writes a slice of every tensor per rank; FSDP reads it, and back.
mpi 2 save "$work/rep2" replicated
mpi 3 load "$work/rep2" fsdp
mpi 4 load "$work/fsdp3" replicated
# Hybrid sharding (2 shard groups of 2 ranks; each replica writes half of its shard) loads on
# FSDP over 1, 2 and 3 ranks and replicated over 4, and the reverse; and 4 replicas of 1.
mpi 4 save "$work/hsdp2x2" hsdp2
for m in 1 2 3; do mpi "$m" load "$work/hsdp2x2" fsdp; done
mpi 4 load "$work/hsdp2x2" replicated
mpi 4 load "$work/hsdp2x2" hsdp1
for n in 1 2 3; do mpi 4 load "$work/fsdp$n" hsdp2; done
mpi 4 load "$work/rep2" hsdp2
# Tied embeddings change the unit layout (the final norm joins the embedding unit).
mpi 3 save "$work/tied3" fsdp-tied
mpi 2 load "$work/tied3" fsdp-tied
mpi 1 load "$work/tied3" fsdp-tied
echo "reshard: all pairs passed"
