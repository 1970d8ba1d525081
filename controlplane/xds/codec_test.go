package xds

import (
	"bytes"
	"fmt"
	"strconv"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
)

// The codec encodes a response byte for byte as the proto codec does,
// and references large resources instead of copying them.
func TestResponseCodec(t *testing.T) {
	big := bytes.Repeat([]byte{0x08, 0x01}, 40000) // a valid message of 80 KB
	small := []byte{0x08, 0x2a}
	unknown := &discovery.DiscoveryResponse{VersionInfo: "3", TypeUrl: xdsapi.ShardMapType, Resources: []*anypb.Any{{TypeUrl: xdsapi.ShardMapType, Value: big}}}
	unknown.ProtoReflect().SetUnknown(protoreflect.RawFields{0xf8, 0x3e, 0x01}) // field 999, varint 1
	anyUnknown := &anypb.Any{TypeUrl: "t", Value: big}
	anyUnknown.ProtoReflect().SetUnknown(protoreflect.RawFields{0xf8, 0x3e, 0x01})
	for _, tc := range []struct {
		name   string
		r      *discovery.DiscoveryResponse
		shared int // buffers referencing a resource
	}{
		{"empty", &discovery.DiscoveryResponse{}, 0},
		{"no resources", &discovery.DiscoveryResponse{VersionInfo: "7", TypeUrl: xdsapi.ShardMapType, Nonce: "1"}, 0},
		{"small", &discovery.DiscoveryResponse{VersionInfo: "7", Nonce: "2", Resources: []*anypb.Any{{TypeUrl: "t", Value: small}}}, 0},
		{"large", &discovery.DiscoveryResponse{VersionInfo: "7", TypeUrl: xdsapi.ShardMapType, Nonce: "12",
			Resources: []*anypb.Any{{TypeUrl: xdsapi.ShardMapType, Value: big}}}, 1},
		{"every field", &discovery.DiscoveryResponse{VersionInfo: "8", Canary: true, TypeUrl: "t", Nonce: "3",
			ControlPlane: &core.ControlPlane{Identifier: "cp-1"}, ResourceErrors: []*discovery.ResourceError{{ErrorDetail: &status.Status{Code: 5, Message: "gone"}}},
			Resources: []*anypb.Any{{TypeUrl: "t", Value: small}, {Value: big}, {TypeUrl: "t"}, {}, {TypeUrl: "u", Value: big}}}, 2},
		{"unknown fields", unknown, 1},
		{"an Any with unknown fields", &discovery.DiscoveryResponse{Resources: []*anypb.Any{anyUnknown}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want, err := proto.Marshal(tc.r)
			if err != nil {
				t.Fatal(err)
			}
			data, err := newResponseCodec().Marshal(tc.r)
			if err != nil {
				t.Fatal(err)
			}
			if got := data.Materialize(); !bytes.Equal(got, want) {
				t.Fatalf("encoded %d bytes, not the proto codec's %d", len(got), len(want))
			}
			shared := 0
			for _, b := range data {
				for _, a := range tc.r.Resources {
					if v := a.GetValue(); len(v) > shareAbove && len(b.ReadOnlyData()) == len(v) && &b.ReadOnlyData()[0] == &v[0] {
						shared++
						break
					}
				}
			}
			if shared != tc.shared {
				t.Fatalf("%d buffers reference a resource's bytes, want %d", shared, tc.shared)
			}
		})
	}
}

// The codec copies every field of a DiscoveryResponse it knows; a field
// added by a newer go-control-plane must be added to it.
func TestResponseCodecKnowsEveryField(t *testing.T) {
	known := map[protoreflect.Name]bool{"version_info": true, "resources": true, "canary": true, "type_url": true,
		"nonce": true, "control_plane": true, "resource_errors": true}
	fields := (&discovery.DiscoveryResponse{}).ProtoReflect().Descriptor().Fields()
	for i := range fields.Len() {
		if f := fields.Get(i); !known[f.Name()] {
			t.Errorf("DiscoveryResponse has field %s (%d): responseCodec.Marshal does not copy it", f.Name(), f.Number())
		}
	}
}

// The proto codec against the shared one, encoding a response that
// carries a 10,000-shard map (what one stream costs per push).
func BenchmarkResponseCodec(b *testing.B) {
	sm := &cellmeshv1.ShardMap{Version: 2, Shards: 10000, Name: ShardMapName}
	for i := range 10000 {
		sm.Assignments = append(sm.Assignments, &cellmeshv1.Assignment{Shard: int32(i), Primary: "us-east-1", Standbys: []string{"eu-west-1"}, Epoch: 1, State: "serving"})
	}
	value, err := proto.Marshal(sm)
	if err != nil {
		b.Fatal(err)
	}
	codec := newResponseCodec()
	for _, shared := range []bool{false, true} {
		name := "proto"
		if shared {
			name = "shared"
		}
		b.Run(fmt.Sprintf("%s/%dKB", name, len(value)>>10), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r := &discovery.DiscoveryResponse{VersionInfo: "2", TypeUrl: ShardMapType, Nonce: strconv.Itoa(i),
					Resources: []*anypb.Any{{TypeUrl: ShardMapType, Value: value}}}
				marshal := codec.proto.Marshal
				if shared {
					marshal = codec.Marshal
				}
				data, err := marshal(r)
				if err != nil {
					b.Fatal(err)
				}
				data.Free()
			}
		})
	}
}
