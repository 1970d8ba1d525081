package meshtls

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestNewCA(t *testing.T) {
	c := newTestCA(t, td, 365*24*time.Hour, t0)
	cert := parseCert(t, c.cert)
	got := struct {
		CN                          string
		URIs                        []string
		IsCA, BasicConstraintsValid bool
		MaxPathLen                  int
		MaxPathLenZero              bool
		KeyUsage                    x509.KeyUsage
		NotBefore, NotAfter         time.Time
	}{cert.Subject.CommonName, uriStrings(cert.URIs), cert.IsCA, cert.BasicConstraintsValid,
		cert.MaxPathLen, cert.MaxPathLenZero, cert.KeyUsage, cert.NotBefore, cert.NotAfter}
	want := got
	want.CN = "cellmesh mesh CA cellmesh.test"
	want.URIs = []string{"spiffe://cellmesh.test"}
	want.IsCA, want.BasicConstraintsValid = true, true
	want.MaxPathLen, want.MaxPathLenZero = 0, true
	want.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	want.NotBefore, want.NotAfter = t0.Add(-time.Minute), t0.Add(365*24*time.Hour)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("CA certificate (-want +got):\n%s", diff)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is %T, want ECDSA P-256", cert.PublicKey)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	block, _ := pem.Decode(c.key)
	if block == nil || block.Type != "PRIVATE KEY" {
		t.Fatalf("key PEM block %v, want PRIVATE KEY", block)
	}
	if _, err := x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
		t.Errorf("key is not PKCS #8: %v", err)
	}
}

func TestNewCAErrors(t *testing.T) {
	tests := []struct {
		name     string
		td       string
		validity time.Duration
		wantErr  string
	}{
		{"empty-trust-domain", "", time.Hour, "trust domain is empty"},
		{"upper-trust-domain", "Mesh", time.Hour, "character 'M'"},
		{"zero-validity", td, 0, "validity 0s is not positive"},
		{"negative-validity", td, -time.Hour, "is not positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := NewCA(tt.td, tt.validity, t0)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("NewCA() error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestIssue(t *testing.T) {
	c := newTestCA(t, td, 365*24*time.Hour, t0)
	id := testID("u1", "ledger")
	certPEM, keyPEM, err := Issue(c.cert, c.key, id, []string{"127.0.0.1", "::1", "localhost", "Ledger.Example.com", "127.0.0.1", "::ffff:10.0.0.1"}, 30*24*time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	cert := parseCert(t, certPEM)
	got := struct {
		URIs                []string
		DNS                 []string
		IPs                 []string
		ExtKeyUsage         []x509.ExtKeyUsage
		KeyUsage            x509.KeyUsage
		IsCA                bool
		NotBefore, NotAfter time.Time
	}{uriStrings(cert.URIs), cert.DNSNames, ipStrings(cert.IPAddresses), cert.ExtKeyUsage, cert.KeyUsage, cert.IsCA, cert.NotBefore, cert.NotAfter}
	want := got
	want.URIs = []string{id.String()}
	want.DNS = []string{"localhost", "ledger.example.com"}
	want.IPs = []string{"127.0.0.1", "::1", "10.0.0.1"}
	want.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	want.KeyUsage = x509.KeyUsageDigitalSignature
	want.IsCA = false
	want.NotBefore, want.NotAfter = t0.Add(-time.Minute), t0.Add(30*24*time.Hour)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("certificate (-want +got):\n%s", diff)
	}
	if bits := cert.SerialNumber.BitLen(); bits > 128 || cert.SerialNumber.Sign() <= 0 {
		t.Errorf("serial %v has %d bits, want a positive number of at most 128", cert.SerialNumber, bits)
	}
	gotID, err := PeerID([]*x509.Certificate{cert})
	if err != nil || gotID != id {
		t.Errorf("PeerID = %v, %v; want %v", gotID, err, id)
	}
	roots := x509.NewCertPool()
	roots.AddCert(parseCert(t, c.cert))
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: t0, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for %v: %v", usage, err)
		}
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" {
		t.Fatalf("key PEM block %v, want PRIVATE KEY", block)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !key.(*ecdsa.PrivateKey).PublicKey.Equal(cert.PublicKey) {
		t.Error("key does not match the certificate")
	}

	// A second certificate has another serial and key.
	second := c.issue(t, id, time.Hour, t0)
	if s2 := parseCert(t, second.cert).SerialNumber; s2.Cmp(cert.SerialNumber) == 0 {
		t.Errorf("two certificates share serial %v", s2)
	}
}

func TestIssueClipsToCA(t *testing.T) {
	c := newTestCA(t, td, 10*24*time.Hour, t0)
	p := c.issue(t, testID("u1", "s"), 30*24*time.Hour, t0)
	caCert, cert := parseCert(t, c.cert), parseCert(t, p.cert)
	if !cert.NotAfter.Equal(caCert.NotAfter) {
		t.Errorf("NotAfter %v, want the CA's %v", cert.NotAfter, caCert.NotAfter)
	}
}

func TestIssuePicksCAByKey(t *testing.T) {
	old := newTestCA(t, td, 24*time.Hour, t0)
	cur := newTestCA(t, td, 24*time.Hour, t0)
	p, _, err := Issue(bundle(old, cur), cur.key, testID("u1", "s"), nil, time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := parseCert(t, p).CheckSignatureFrom(parseCert(t, cur.cert)); err != nil {
		t.Errorf("not signed by the CA of the key: %v", err)
	}
}

func TestIssueErrors(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	other := newTestCA(t, "other.test", 24*time.Hour, t0)
	leaf := c.issue(t, testID("u1", "s"), time.Hour, t0)
	good := testID("u1", "s")
	tests := []struct {
		name     string
		caCert   []byte
		caKey    []byte
		id       ID
		hosts    []string
		validity time.Duration
		now      time.Time
		wantErr  string
	}{
		{"foreign-trust-domain", c.cert, c.key, ID{"other.test", "r", "u", "s"}, nil, time.Hour, t0, `in trust domain "other.test", but the CA signs for "cellmesh.test"`},
		{"invalid-id", c.cert, c.key, ID{td, "r", "u/1", "s"}, nil, time.Hour, t0, `unit "u/1" has character '/'`},
		{"empty-service", c.cert, c.key, ID{td, "r", "u", ""}, nil, time.Hour, t0, "service is empty"},
		{"zero-validity", c.cert, c.key, good, nil, 0, t0, "validity 0s is not positive"},
		{"bad-host", c.cert, c.key, good, []string{"bad host"}, time.Hour, t0, `host "bad host"`},
		{"empty-host", c.cert, c.key, good, []string{""}, time.Hour, t0, "empty host name"},
		{"zoned-ip", c.cert, c.key, good, []string{"fe80::1%eth0"}, time.Hour, t0, "zone"},
		{"key-of-another-ca", c.cert, other.key, good, nil, time.Hour, t0, "does not belong to any certificate"},
		{"not-a-ca", leaf.cert, leaf.key, good, nil, time.Hour, t0, "is not a CA"},
		{"no-ca-pem", nil, c.key, good, nil, time.Hour, t0, `no PEM "CERTIFICATE" block`},
		{"no-key-pem", c.cert, c.cert, good, nil, time.Hour, t0, `no PEM "PRIVATE KEY" block`},
		{"garbage-key", c.cert, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), good, nil, time.Hour, t0, "parse"},
		{"expired-ca", c.cert, c.key, good, nil, time.Hour, t0.Add(25 * time.Hour), "expired at"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert, key, err := Issue(tt.caCert, tt.caKey, tt.id, tt.hosts, tt.validity, tt.now)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Issue() error %v, want one containing %q", err, tt.wantErr)
			}
			if cert != nil || key != nil {
				t.Error("Issue returned material with an error")
			}
		})
	}
}

func uriStrings(us []*url.URL) []string {
	var out []string
	for _, u := range us {
		out = append(out, u.String())
	}
	return out
}

func ipStrings(ips []net.IP) []string {
	var out []string
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	return out
}
