package meshtls

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// backdate is how far before now certificates start to be valid, for
// clocks that lag a little.
const backdate = time.Minute

// PEM block types.
const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY" // PKCS #8
)

// NewCA makes a self-signed mesh CA for trustDomain, valid from now (less a
// minute) for validity: an ECDSA P-256 key, common name "cellmesh mesh CA
// <trust-domain>", the URI SAN spiffe://<trust-domain>, and the basic
// constraints of a CA that signs workload certificates only (MaxPathLen 0,
// key usage CertSign and CRLSign). The key is PEM "PRIVATE KEY" (PKCS #8).
func NewCA(trustDomain string, validity time.Duration, now time.Time) (certPEM, keyPEM []byte, err error) {
	if err := ValidateTrustDomain(trustDomain); err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	if validity <= 0 {
		return nil, nil, fmt.Errorf("validity %v is not positive", validity)
	}
	key, serial, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "cellmesh mesh CA " + trustDomain},
		URIs:                  []*url.URL{{Scheme: Scheme, Host: trustDomain}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate: %w", err)
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: der}), keyPEM, nil
}

// Issue signs a workload certificate for id with the CA in caCertPEM (the
// certificate among those in the PEM whose public key matches caKeyPEM) and
// returns it with its new ECDSA P-256 key (PEM "PRIVATE KEY", PKCS #8).
//
// The certificate carries id as its one URI SAN, each of hosts as a DNS or
// IP SAN (IP addresses are recognized with net/netip), the extended key
// usages ServerAuth and ClientAuth, and a random 128-bit serial. It is valid
// from now less a minute until now+validity or the CA's own expiry,
// whichever comes first. Issue refuses an id outside the CA's trust domain
// (the host of the CA's spiffe:// URI SAN) and a CA that has expired.
func Issue(caCertPEM, caKeyPEM []byte, id ID, hosts []string, validity time.Duration, now time.Time) (certPEM, keyPEM []byte, err error) {
	if err := id.Validate(); err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	if validity <= 0 {
		return nil, nil, fmt.Errorf("validity %v is not positive", validity)
	}
	dnsNames, ips, err := splitHosts(hosts)
	if err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	ca, caKey, td, err := parseCA(caCertPEM, caKeyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	if id.TrustDomain != td {
		return nil, nil, fmt.Errorf("id %s is in trust domain %q, but the CA signs for %q", id, id.TrustDomain, td)
	}
	if !now.Before(ca.NotAfter) {
		return nil, nil, fmt.Errorf("CA %q expired at %s", ca.Subject.CommonName, formatTime(ca.NotAfter))
	}
	notAfter := now.Add(validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	key, serial, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: id.Service},
		URIs:                  []*url.URL{id.URI()},
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate: %w", err)
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: der}), keyPEM, nil
}

// CATrustDomain returns the trust domain of the CA whose key is caKeyPEM,
// among the certificates of caCertPEM: the trust domain Issue signs for.
func CATrustDomain(caCertPEM, caKeyPEM []byte) (string, error) {
	_, _, td, err := parseCA(caCertPEM, caKeyPEM)
	return td, err
}

// parseCA returns the CA certificate of caCertPEM whose key is caKeyPEM,
// the key, and the trust domain it signs for.
func parseCA(caCertPEM, caKeyPEM []byte) (*x509.Certificate, crypto.Signer, string, error) {
	key, err := parseKey(caKeyPEM)
	if err != nil {
		return nil, nil, "", fmt.Errorf("ca key: %w", err)
	}
	certs, err := parseCerts(caCertPEM)
	if err != nil {
		return nil, nil, "", fmt.Errorf("ca certificate: %w", err)
	}
	ca := certForKey(certs, key.Public())
	if ca == nil {
		return nil, nil, "", errors.New("the ca key does not belong to any certificate of the ca certificate PEM")
	}
	if !ca.IsCA || !ca.BasicConstraintsValid || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, nil, "", fmt.Errorf("certificate %q is not a CA that may sign certificates", ca.Subject.CommonName)
	}
	td, err := caTrustDomain(ca)
	if err != nil {
		return nil, nil, "", err
	}
	return ca, key, td, nil
}

// splitHosts sorts hosts into DNS names and IP addresses, dropping
// duplicates.
func splitHosts(hosts []string) (dnsNames []string, ips []net.IP, err error) {
	seen := map[string]bool{}
	for _, h := range hosts {
		if addr, err := netip.ParseAddr(h); err == nil {
			if addr.Zone() != "" {
				return nil, nil, fmt.Errorf("host %q: an IP address with a zone cannot be a certificate SAN", h)
			}
			addr = addr.Unmap()
			if !seen[addr.String()] {
				seen[addr.String()] = true
				ips = append(ips, net.IP(addr.AsSlice()))
			}
			continue
		}
		if p := dnsNameProblem(h); p != "" {
			return nil, nil, fmt.Errorf("host %q: %s", h, p)
		}
		name := strings.ToLower(h)
		if !seen[name] {
			seen[name] = true
			dnsNames = append(dnsNames, name)
		}
	}
	return dnsNames, ips, nil
}

// dnsNameProblem describes what keeps name from being a DNS SAN: labels of
// letters, digits and '-', joined by dots, with an optional leading "*.".
func dnsNameProblem(name string) string {
	if name == "" {
		return "empty host name"
	}
	if len(name) > 253 {
		return "host name longer than 253 bytes"
	}
	rest := strings.TrimPrefix(name, "*.")
	for _, label := range strings.Split(rest, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "not an IP address nor a DNS name (labels of 1-63 letters, digits or '-', joined by dots)"
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Sprintf("not an IP address nor a DNS name: it has %s", describeByte(c))
			}
		}
	}
	return ""
}

// caTrustDomain returns the trust domain a CA signs for: the host of its
// spiffe:// URI SAN.
func caTrustDomain(ca *x509.Certificate) (string, error) {
	for _, u := range ca.URIs {
		if u.Scheme == Scheme && (u.Path == "" || u.Path == "/") {
			if err := ValidateTrustDomain(u.Host); err != nil {
				return "", fmt.Errorf("CA %q: %w", ca.Subject.CommonName, err)
			}
			return u.Host, nil
		}
	}
	return "", fmt.Errorf("CA %q has no %s://<trust-domain> URI SAN; make a mesh CA with 'cellmesh certs init'", ca.Subject.CommonName, Scheme)
}

// randomSerial returns a random, positive 128-bit serial number.
// newKey makes a P-256 key and a random serial for its certificate.
func newKey() (*ecdsa.PrivateKey, *big.Int, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	return key, serial, nil
}

func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), nil
}

// parseCerts returns every certificate of a PEM file, which must hold
// CERTIFICATE blocks only, at least one.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for n := 1; ; n++ {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != pemCertificate {
			return nil, fmt.Errorf("PEM block %d is a %q, want only %q blocks", n, block.Type, pemCertificate)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("no PEM %q block", pemCertificate)
	}
	return certs, nil
}

// parseKey returns the private key of a PEM file: its one "PRIVATE KEY"
// (PKCS #8), "EC PRIVATE KEY" (SEC 1) or "RSA PRIVATE KEY" (PKCS #1) block.
func parseKey(data []byte) (crypto.Signer, error) {
	var found *pem.Block
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if !strings.HasSuffix(block.Type, "PRIVATE KEY") {
			continue
		}
		if found != nil {
			return nil, errors.New("more than one private key PEM block")
		}
		found = block
	}
	if found == nil {
		return nil, fmt.Errorf("no PEM %q block", pemPrivateKey)
	}
	var key any
	var err error
	switch found.Type {
	case pemPrivateKey:
		key, err = x509.ParsePKCS8PrivateKey(found.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(found.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(found.Bytes)
	default:
		return nil, fmt.Errorf("PEM block %q is not a supported private key (want %q)", found.Type, pemPrivateKey)
	}
	if err != nil {
		return nil, fmt.Errorf("parse %q: %w", found.Type, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", key)
	}
	return signer, nil
}

// certForKey returns the certificate whose public key is pub, or nil.
func certForKey(certs []*x509.Certificate, pub crypto.PublicKey) *x509.Certificate {
	for _, c := range certs {
		if k, ok := c.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); ok && k.Equal(pub) {
			return c
		}
	}
	return nil
}

func formatTime(t time.Time) string { return t.UTC().Format(time.RFC3339) }
