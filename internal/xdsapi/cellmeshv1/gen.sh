#!/bin/sh
# Regenerates cellmesh.pb.go from cellmesh.proto. Needs protoc on PATH
# (Debian: apt-get install protobuf-compiler); protoc-gen-go is pinned here.
set -eu
cd "$(dirname "$0")"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
GOBIN="$bin" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
protoc --plugin=protoc-gen-go="$bin/protoc-gen-go" --go_out=paths=source_relative:. cellmesh.proto
