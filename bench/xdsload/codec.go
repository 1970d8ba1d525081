package main

import (
	"errors"
	"fmt"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/anypb"
)

// prefixLen is how much of each resource a client keeps: enough for the
// shard map's version, its first field.
const prefixLen = 32

// lightCodec is a client's gRPC codec. It reads a DiscoveryResponse field
// by field straight from the received buffers, keeping its version, type,
// nonce and the first prefixLen bytes of each resource, and skipping the
// rest of the resources without copying them: the whole response is
// still received and decrypted, but the simulated clients leave the CPU
// to the control plane (a sidecar decodes the map on its own machine).
// Requests are encoded by the proto codec. One per stream: Unmarshal
// records the size of the last response's resources.
type lightCodec struct {
	proto encoding.CodecV2
	// size is the size of the resources of the last response decoded.
	size int
}

func newLightCodec() *lightCodec {
	return &lightCodec{proto: encoding.GetCodecV2(protocodec.Name)}
}

func (c *lightCodec) Name() string                           { return protocodec.Name }
func (c *lightCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c *lightCodec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*discovery.DiscoveryResponse)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	cur := &cursor{bufs: data}
	c.size = 0
	for !cur.done() {
		num, typ, err := cur.tag()
		if err != nil {
			return err
		}
		switch {
		case typ != protowire.BytesType:
			if err := cur.skipValue(typ); err != nil {
				return err
			}
		case num == 1:
			s, err := cur.bytes()
			if err != nil {
				return err
			}
			r.VersionInfo = string(s)
		case num == 2:
			n, err := cur.varint()
			if err != nil {
				return err
			}
			a, size, err := cur.any(int(n))
			if err != nil {
				return err
			}
			r.Resources = append(r.Resources, a)
			c.size += size
		case num == 4:
			s, err := cur.bytes()
			if err != nil {
				return err
			}
			r.TypeUrl = string(s)
		case num == 5:
			s, err := cur.bytes()
			if err != nil {
				return err
			}
			r.Nonce = string(s)
		default:
			if err := cur.skipValue(typ); err != nil {
				return err
			}
		}
	}
	return nil
}

var errTruncated = errors.New("xds response: truncated")

// cursor reads a BufferSlice front to back without joining its buffers.
type cursor struct {
	bufs mem.BufferSlice
	i    int    // next buffer
	b    []byte // rest of the current one
	pos  int    // bytes consumed
}

func (c *cursor) fill() bool {
	for len(c.b) == 0 {
		if c.i >= len(c.bufs) {
			return false
		}
		c.b = c.bufs[c.i].ReadOnlyData()
		c.i++
	}
	return true
}

func (c *cursor) done() bool { return !c.fill() }

func (c *cursor) varint() (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		if !c.fill() {
			return 0, errTruncated
		}
		b := c.b[0]
		c.b = c.b[1:]
		c.pos++
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, nil
		}
	}
	return 0, errors.New("xds response: varint overflow")
}

func (c *cursor) tag() (protowire.Number, protowire.Type, error) {
	v, err := c.varint()
	if err != nil {
		return 0, 0, err
	}
	num, typ := protowire.DecodeTag(v)
	if num < protowire.MinValidNumber {
		return 0, 0, fmt.Errorf("xds response: field number %d", num)
	}
	return num, typ, nil
}

// take copies the next n bytes, keeping at most keep of them.
func (c *cursor) take(n, keep int) ([]byte, error) {
	out := make([]byte, 0, min(n, keep))
	for n > 0 {
		if !c.fill() {
			return nil, errTruncated
		}
		k := min(n, len(c.b))
		if room := keep - len(out); room > 0 {
			out = append(out, c.b[:min(k, room)]...)
		}
		c.b = c.b[k:]
		c.pos += k
		n -= k
	}
	return out, nil
}

func (c *cursor) bytes() ([]byte, error) {
	n, err := c.varint()
	if err != nil {
		return nil, err
	}
	return c.take(int(n), int(n))
}

func (c *cursor) skipValue(typ protowire.Type) error {
	var err error
	switch typ {
	case protowire.VarintType:
		_, err = c.varint()
	case protowire.Fixed32Type:
		_, err = c.take(4, 0)
	case protowire.Fixed64Type:
		_, err = c.take(8, 0)
	case protowire.BytesType:
		var n uint64
		if n, err = c.varint(); err == nil {
			_, err = c.take(int(n), 0)
		}
	default:
		err = fmt.Errorf("xds response: wire type %d", typ)
	}
	return err
}

// any reads an Any of n bytes: its type URL and the first prefixLen
// bytes of its value; size is the value's whole size.
func (c *cursor) any(n int) (a *anypb.Any, size int, err error) {
	a = &anypb.Any{}
	end := c.pos + n
	for c.pos < end {
		num, typ, err := c.tag()
		if err != nil {
			return nil, 0, err
		}
		switch {
		case num == 1 && typ == protowire.BytesType:
			s, err := c.bytes()
			if err != nil {
				return nil, 0, err
			}
			a.TypeUrl = string(s)
		case num == 2 && typ == protowire.BytesType:
			l, err := c.varint()
			if err != nil {
				return nil, 0, err
			}
			if a.Value, err = c.take(int(l), prefixLen); err != nil {
				return nil, 0, err
			}
			size = int(l)
		default:
			if err := c.skipValue(typ); err != nil {
				return nil, 0, err
			}
		}
	}
	if c.pos != end {
		return nil, 0, errors.New("xds response: resource overruns its length")
	}
	return a, size, nil
}
