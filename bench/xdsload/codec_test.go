package main

import (
	"bytes"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
)

// The light codec reads what the proto codec reads of a response (its
// version, type, nonce, and each resource's type and first bytes),
// whatever the buffers it arrives in, and the map's version from them.
func TestLightCodec(t *testing.T) {
	sm := &cellmeshv1.ShardMap{Version: 1234567, Shards: 10000, Name: xdsapi.ShardMapName}
	for i := range 10000 {
		sm.Assignments = append(sm.Assignments, &cellmeshv1.Assignment{Shard: int32(i), Primary: "us-east-1", Standbys: []string{"eu-west-1"}, Epoch: 3})
	}
	value, err := proto.Marshal(sm)
	if err != nil {
		t.Fatal(err)
	}
	want := &discovery.DiscoveryResponse{
		VersionInfo: "42", TypeUrl: xdsapi.ShardMapType, Nonce: "7", Canary: true,
		Resources: []*anypb.Any{{TypeUrl: xdsapi.ShardMapType, Value: value}, {TypeUrl: "x", Value: []byte("small")}},
	}
	wire, err := proto.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	for _, chunk := range []int{len(wire), 16384, 1000, 7, 1} {
		var data mem.BufferSlice
		for rest := wire; len(rest) > 0; {
			n := min(chunk, len(rest))
			data = append(data, mem.SliceBuffer(rest[:n]))
			rest = rest[n:]
		}
		c := newLightCodec()
		var got discovery.DiscoveryResponse
		if err := c.Unmarshal(data, &got); err != nil {
			t.Fatalf("chunks of %d: %v", chunk, err)
		}
		if got.VersionInfo != "42" || got.TypeUrl != xdsapi.ShardMapType || got.Nonce != "7" || len(got.Resources) != 2 {
			t.Fatalf("chunks of %d: got %v", chunk, &got)
		}
		if got.Resources[0].TypeUrl != xdsapi.ShardMapType || !bytes.Equal(got.Resources[0].Value, value[:prefixLen]) ||
			got.Resources[1].TypeUrl != "x" || string(got.Resources[1].Value) != "small" {
			t.Fatalf("chunks of %d: resources %v", chunk, got.Resources)
		}
		if c.size != len(value)+5 {
			t.Fatalf("chunks of %d: size %d, want %d", chunk, c.size, len(value)+5)
		}
		if v, err := mapVersion(got.Resources[0].Value); err != nil || v != 1234567 {
			t.Fatalf("chunks of %d: map version %d, %v", chunk, v, err)
		}
	}
	// Truncated input is an error, not a short response.
	c := newLightCodec()
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(wire[:len(wire)/2])}, new(discovery.DiscoveryResponse)); err == nil {
		t.Fatal("a truncated response decoded")
	}
}
