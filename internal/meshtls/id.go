package meshtls

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Scheme is the URI scheme of an ID.
const Scheme = "spiffe"

// MaxIDLength is the longest ID, in bytes of its URI.
const MaxIDLength = 255

// ErrInvalidID is wrapped by every error about a malformed ID.
var ErrInvalidID = errors.New("invalid workload id")

// ID is a workload identity, carried as the one URI SAN of a certificate:
//
//	spiffe://<trust-domain>/region/<R>/unit/<U>/service/<S>
//
// The trust domain is a lowercase DNS-like name shared by the whole mesh
// (one CA, or several during a rotation); region, unit and service are
// segments of [A-Za-z0-9._-]+ (neither "." nor ".."). The whole URI is at
// most MaxIDLength bytes.
type ID struct {
	TrustDomain string
	Region      string
	Unit        string
	Service     string
}

// URI returns the ID as a URL, for a certificate's URIs.
func (id ID) URI() *url.URL {
	return &url.URL{Scheme: Scheme, Host: id.TrustDomain, Path: id.path()}
}

// String returns the spiffe:// URI of the ID.
func (id ID) String() string {
	return Scheme + "://" + id.TrustDomain + id.path()
}

func (id ID) path() string {
	return "/region/" + id.Region + "/unit/" + id.Unit + "/service/" + id.Service
}

// Validate reports what is wrong with the ID, wrapping ErrInvalidID.
func (id ID) Validate() error {
	if p := id.problem(); p != "" {
		return fmt.Errorf("%w: %s", ErrInvalidID, p)
	}
	return nil
}

// problem describes the first thing wrong with id, or returns "".
func (id ID) problem() string {
	if p := trustDomainProblem(id.TrustDomain); p != "" {
		return p
	}
	for _, part := range []struct{ name, value string }{
		{"region", id.Region}, {"unit", id.Unit}, {"service", id.Service},
	} {
		if p := segmentProblem(part.value); p != "" {
			return part.name + " " + p
		}
	}
	if n := len(id.String()); n > MaxIDLength {
		return fmt.Sprintf("%d bytes long, at most %d allowed", n, MaxIDLength)
	}
	return ""
}

// trustDomainProblem describes what is wrong with a trust domain: it must be
// a lowercase DNS-like name, labels of [a-z0-9-] (not starting or ending
// with '-', at most 63 bytes) joined by dots.
func trustDomainProblem(td string) string {
	if td == "" {
		return "trust domain is empty"
	}
	if len(td) > MaxIDLength {
		return fmt.Sprintf("trust domain is %d bytes long, at most %d allowed", len(td), MaxIDLength)
	}
	for _, label := range strings.Split(td, ".") {
		switch {
		case label == "":
			return fmt.Sprintf("trust domain %q has an empty label (want a lowercase DNS name like mesh.example.com)", td)
		case len(label) > 63:
			return fmt.Sprintf("trust domain %q has a label longer than 63 bytes", td)
		case label[0] == '-' || label[len(label)-1] == '-':
			return fmt.Sprintf("trust domain %q has a label that starts or ends with '-'", td)
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Sprintf("trust domain %q has %s (allowed: a-z 0-9 - and dots between labels)", td, describeByte(c))
			}
		}
	}
	return ""
}

// segmentProblem describes what is wrong with a region, unit or service
// segment, or returns "". The description starts with the quoted value.
func segmentProblem(s string) string {
	if s == "" {
		return "is empty"
	}
	if s == "." || s == ".." {
		return fmt.Sprintf("%q is not allowed", s)
	}
	for _, c := range []byte(s) {
		if !validSegmentByte(c) {
			return fmt.Sprintf("%q has %s (allowed: A-Z a-z 0-9 . _ -)", s, describeByte(c))
		}
	}
	return ""
}

func validSegmentByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
}

func describeByte(c byte) string {
	if c < 0x20 || c >= 0x7f {
		return fmt.Sprintf("byte 0x%02x", c)
	}
	return fmt.Sprintf("character %q", rune(c))
}

// ValidateSegment reports whether s may be a region, unit or service of an
// ID, for callers that check one part before an ID is whole (flags).
func ValidateSegment(s string) error {
	if p := segmentProblem(s); p != "" {
		return fmt.Errorf("%w: segment %s", ErrInvalidID, p)
	}
	return nil
}

// ValidateTrustDomain reports whether td may be the trust domain of an ID.
func ValidateTrustDomain(td string) error {
	if p := trustDomainProblem(td); p != "" {
		return fmt.Errorf("%w: %s", ErrInvalidID, p)
	}
	return nil
}

// ParseID parses the spiffe:// URI of an ID strictly: the scheme is
// exactly "spiffe"; there is no user info, port, query or fragment; the path
// is exactly /region/R/unit/U/service/S; every part is valid (see ID). No
// escape or normalization is undone, so ParseID(s).String() == s.
func ParseID(s string) (ID, error) {
	bad := func(format string, args ...any) (ID, error) {
		return ID{}, fmt.Errorf("%w %q: %s", ErrInvalidID, s, fmt.Sprintf(format, args...))
	}
	if len(s) > MaxIDLength {
		return bad("%d bytes long, at most %d allowed", len(s), MaxIDLength)
	}
	rest, ok := strings.CutPrefix(s, Scheme+"://")
	if !ok {
		scheme, _, found := strings.Cut(s, ":")
		switch {
		case found && scheme == Scheme:
			return bad("want %s://<trust-domain>/region/R/unit/U/service/S", Scheme)
		case found && scheme != "" && !strings.Contains(scheme, "/"):
			return bad("scheme is %q, want %q", scheme, Scheme)
		}
		return bad("not a %s:// URI", Scheme)
	}
	if i := strings.IndexByte(rest, '#'); i >= 0 {
		return bad("has a fragment")
	}
	if i := strings.IndexByte(rest, '?'); i >= 0 {
		return bad("has a query")
	}
	host, path, hasPath := strings.Cut(rest, "/")
	switch {
	case strings.Contains(host, "@"):
		return bad("has user info")
	case strings.HasPrefix(host, "["):
		return bad("trust domain %s is an IP address, want a DNS-like name", host)
	case strings.Contains(host, ":"):
		return bad("has a port")
	case !hasPath || path == "":
		return bad("has no path, want /region/R/unit/U/service/S")
	}
	segs := strings.Split(path, "/")
	if len(segs) != 6 || segs[0] != "region" || segs[2] != "unit" || segs[4] != "service" {
		return bad("path is /%s, want /region/R/unit/U/service/S", path)
	}
	id := ID{TrustDomain: host, Region: segs[1], Unit: segs[3], Service: segs[5]}
	if p := id.problem(); p != "" {
		return bad("%s", p)
	}
	return id, nil
}

// PeerID returns the ID of a certificate chain's leaf, certs[0]. The leaf
// must not be a CA and must carry exactly one URI SAN, a valid ID. It does
// not verify the chain: see Store for that.
func PeerID(certs []*x509.Certificate) (ID, error) {
	if len(certs) == 0 || certs[0] == nil {
		return ID{}, errors.New("no certificate")
	}
	leaf := certs[0]
	if leaf.IsCA {
		return ID{}, fmt.Errorf("certificate %q is a CA certificate, not a workload certificate", leaf.Subject.CommonName)
	}
	switch len(leaf.URIs) {
	case 0:
		return ID{}, fmt.Errorf("certificate %q has no URI SAN; want one %s:// identity", leaf.Subject.CommonName, Scheme)
	case 1:
	default:
		return ID{}, fmt.Errorf("certificate %q has %d URI SANs; want exactly one %s:// identity", leaf.Subject.CommonName, len(leaf.URIs), Scheme)
	}
	return ParseID(leaf.URIs[0].String())
}

// ControlPlaneService is the service of a control-plane replica's ID: its
// certificate says spiffe://<td>/region/<R>/unit/<replica>/service/
// cellmesh-controlplane, and sidecars accept an xDS server only with it.
const ControlPlaneService = "cellmesh-controlplane"
