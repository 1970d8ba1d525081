package meshtls

import (
	"crypto/x509"
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseID(t *testing.T) {
	long := strings.Repeat("a", 200)
	tests := []struct {
		name    string
		in      string
		want    ID
		wantErr string // substring of the error; "" means no error
	}{
		{"simple", "spiffe://cellmesh.test/region/us-east/unit/u1/service/ledger",
			ID{"cellmesh.test", "us-east", "u1", "ledger"}, ""},
		{"single-label-domain", "spiffe://mesh/region/r/unit/u/service/s", ID{"mesh", "r", "u", "s"}, ""},
		{"segment-chars", "spiffe://a-b.c0/region/US_East.1/unit/u-1_x.y/service/Ledger-V2",
			ID{"a-b.c0", "US_East.1", "u-1_x.y", "Ledger-V2"}, ""},
		{"max-length", "spiffe://t/region/r/unit/u/service/" + strings.Repeat("s", MaxIDLength-len("spiffe://t/region/r/unit/u/service/")),
			ID{"t", "r", "u", strings.Repeat("s", MaxIDLength-len("spiffe://t/region/r/unit/u/service/"))}, ""},

		{"empty", "", ID{}, "not a spiffe:// URI"},
		{"no-scheme", "cellmesh.test/region/r/unit/u/service/s", ID{}, "not a spiffe:// URI"},
		{"https-scheme", "https://cellmesh.test/region/r/unit/u/service/s", ID{}, `scheme is "https"`},
		{"upper-scheme", "SPIFFE://cellmesh.test/region/r/unit/u/service/s", ID{}, `scheme is "SPIFFE"`},
		{"opaque", "spiffe:cellmesh.test/region/r/unit/u/service/s", ID{}, "want spiffe://<trust-domain>/region"},
		{"one-slash", "spiffe:/cellmesh.test/region/r/unit/u/service/s", ID{}, "want spiffe://<trust-domain>/region"},
		{"port", "spiffe://cellmesh.test:443/region/r/unit/u/service/s", ID{}, "has a port"},
		{"userinfo", "spiffe://me@cellmesh.test/region/r/unit/u/service/s", ID{}, "has user info"},
		{"query", "spiffe://cellmesh.test/region/r/unit/u/service/s?x=1", ID{}, "has a query"},
		{"empty-query", "spiffe://cellmesh.test/region/r/unit/u/service/s?", ID{}, "has a query"},
		{"fragment", "spiffe://cellmesh.test/region/r/unit/u/service/s#f", ID{}, "has a fragment"},
		{"no-path", "spiffe://cellmesh.test", ID{}, "has no path"},
		{"root-path", "spiffe://cellmesh.test/", ID{}, "has no path"},
		{"empty-domain", "spiffe:///region/r/unit/u/service/s", ID{}, "trust domain is empty"},
		{"upper-domain", "spiffe://Cellmesh.test/region/r/unit/u/service/s", ID{}, `has character 'C'`},
		{"underscore-domain", "spiffe://cell_mesh/region/r/unit/u/service/s", ID{}, `has character '_'`},
		{"domain-empty-label", "spiffe://cellmesh..test/region/r/unit/u/service/s", ID{}, "empty label"},
		{"domain-trailing-dot", "spiffe://cellmesh.test./region/r/unit/u/service/s", ID{}, "empty label"},
		{"domain-hyphen", "spiffe://-cellmesh.test/region/r/unit/u/service/s", ID{}, "starts or ends with '-'"},
		{"domain-long-label", "spiffe://" + strings.Repeat("a", 64) + "/region/r/unit/u/service/s", ID{}, "longer than 63"},
		{"ipv6-domain", "spiffe://[::1]/region/r/unit/u/service/s", ID{}, "is an IP address"},
		{"too-few-segments", "spiffe://cellmesh.test/region/r/unit/u", ID{}, "want /region/R/unit/U/service/S"},
		{"too-many-segments", "spiffe://cellmesh.test/region/r/unit/u/service/s/x", ID{}, "want /region/R/unit/U/service/S"},
		{"trailing-slash", "spiffe://cellmesh.test/region/r/unit/u/service/s/", ID{}, "want /region/R/unit/U/service/S"},
		{"double-slash", "spiffe://cellmesh.test//region/r/unit/u/service/s", ID{}, "want /region/R/unit/U/service/S"},
		{"wrong-order", "spiffe://cellmesh.test/unit/u/region/r/service/s", ID{}, "want /region/R/unit/U/service/S"},
		{"wrong-keyword-case", "spiffe://cellmesh.test/Region/r/unit/u/service/s", ID{}, "want /region/R/unit/U/service/S"},
		{"empty-region", "spiffe://cellmesh.test/region//unit/u/service/s", ID{}, "region is empty"},
		{"empty-service", "spiffe://cellmesh.test/region/r/unit/u/service/", ID{}, "service is empty"},
		{"dot-unit", "spiffe://cellmesh.test/region/r/unit/./service/s", ID{}, `unit "." is not allowed`},
		{"dotdot-unit", "spiffe://cellmesh.test/region/r/unit/../service/s", ID{}, `unit ".." is not allowed`},
		{"escaped", "spiffe://cellmesh.test/region/r/unit/u%2Fv/service/s", ID{}, `has character '%'`},
		{"space", "spiffe://cellmesh.test/region/r/unit/u v/service/s", ID{}, `has character ' '`},
		{"unicode", "spiffe://cellmesh.test/region/r/unit/ü/service/s", ID{}, "has byte 0xc3"},
		{"control", "spiffe://cellmesh.test/region/r/unit/u\x00/service/s", ID{}, "has byte 0x00"},
		{"too-long", "spiffe://t/region/r/unit/u/service/" + long + long, ID{}, "at most 255"},
		{"too-long-by-one", "spiffe://t/region/r/unit/u/service/" + strings.Repeat("s", MaxIDLength-len("spiffe://t/region/r/unit/u/service/")+1), ID{}, "at most 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseID(tt.in)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("ParseID(%q): %v", tt.in, err)
				}
				if diff := cmp.Diff(tt.want, got); diff != "" {
					t.Errorf("ParseID(%q) (-want +got):\n%s", tt.in, diff)
				}
				if got.String() != tt.in {
					t.Errorf("String() = %q, want %q", got.String(), tt.in)
				}
				if got.URI().String() != tt.in {
					t.Errorf("URI().String() = %q, want %q", got.URI(), tt.in)
				}
				if err := got.Validate(); err != nil {
					t.Errorf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParseID(%q) = %+v, want an error containing %q", tt.in, got, tt.wantErr)
			}
			if !errors.Is(err, ErrInvalidID) {
				t.Errorf("error %v does not wrap ErrInvalidID", err)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q lacks %q", err, tt.wantErr)
			}
		})
	}
}

func TestIDValidate(t *testing.T) {
	good := ID{"cellmesh.test", "us-east", "u1", "ledger"}
	tests := []struct {
		name    string
		mutate  func(*ID)
		wantErr string
	}{
		{"good", func(*ID) {}, ""},
		{"empty-trust-domain", func(id *ID) { id.TrustDomain = "" }, "trust domain is empty"},
		{"empty-region", func(id *ID) { id.Region = "" }, "region is empty"},
		{"empty-unit", func(id *ID) { id.Unit = "" }, "unit is empty"},
		{"empty-service", func(id *ID) { id.Service = "" }, "service is empty"},
		{"slash-in-unit", func(id *ID) { id.Unit = "a/b" }, `unit "a/b" has character '/'`},
		{"too-long", func(id *ID) { id.Service = strings.Repeat("s", 250) }, "at most 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := good
			tt.mutate(&id)
			err := id.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalidID) {
				t.Errorf("Validate() = %v, want an ErrInvalidID containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestPeerID(t *testing.T) {
	id := ID{"cellmesh.test", "r", "u", "s"}
	uri := func(s string) *url.URL {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	tests := []struct {
		name    string
		certs   []*x509.Certificate
		want    ID
		wantErr string
	}{
		{"one-uri", []*x509.Certificate{{URIs: []*url.URL{id.URI()}}}, id, ""},
		{"none", nil, ID{}, "no certificate"},
		{"nil-leaf", []*x509.Certificate{nil}, ID{}, "no certificate"},
		{"no-uri", []*x509.Certificate{{}}, ID{}, "has no URI SAN"},
		{"two-uris", []*x509.Certificate{{URIs: []*url.URL{id.URI(), uri("https://example.com")}}}, ID{}, "has 2 URI SANs"},
		{"ca", []*x509.Certificate{{IsCA: true, URIs: []*url.URL{id.URI()}}}, ID{}, "is a CA certificate"},
		{"not-spiffe", []*x509.Certificate{{URIs: []*url.URL{uri("https://example.com/x")}}}, ID{}, `scheme is "https"`},
		{"trust-domain-only", []*x509.Certificate{{URIs: []*url.URL{uri("spiffe://cellmesh.test")}}}, ID{}, "has no path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := PeerID(tt.certs)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(tt.want, got); diff != "" {
					t.Errorf("(-want +got):\n%s", diff)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("PeerID() = %v, %v; want error containing %q", got, err, tt.wantErr)
			}
		})
	}
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{
		"spiffe://cellmesh.test/region/us-east/unit/u1/service/ledger",
		"spiffe://a/region/b/unit/c/service/d",
		"spiffe://cellmesh.test:1/region/r/unit/u/service/s",
		"spiffe://cellmesh.test/region/r/unit/u/service/s?#",
		"spiffe://x/region/../unit/u/service/s",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidID) {
				t.Fatalf("error %v does not wrap ErrInvalidID", err)
			}
			return
		}
		if id.String() != s {
			t.Fatalf("ParseID(%q).String() = %q", s, id.String())
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("ParseID(%q) accepted an id that Validate refuses: %v", s, err)
		}
		// What a certificate carries comes back through net/url.
		u, err := url.Parse(id.URI().String())
		if err != nil {
			t.Fatalf("url.Parse(%q): %v", id.URI(), err)
		}
		back, err := PeerID([]*x509.Certificate{{URIs: []*url.URL{u}}})
		if err != nil || back != id {
			t.Fatalf("PeerID of %q = %v, %v; want %v", s, back, err, id)
		}
	})
}
