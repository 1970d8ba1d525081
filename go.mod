module github.com/cellmesh/cellmesh

go 1.26

require (
	github.com/cespare/xxhash/v2 v2.3.0
	go.yaml.in/yaml/v3 v3.0.6
)

require github.com/google/go-cmp v0.7.0
