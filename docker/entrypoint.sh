#!/bin/sh
# Every subcommand of the CLI works: serve (default), worker, preannotate, export-coco, ...
set -e
exec grounded-sam-backend "$@"
