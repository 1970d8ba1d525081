// Command client sends a few users' requests into the local example mesh
// through one unit's sidecar and prints which unit answered each, checking
// it against the topology: the user's home unit, whatever its region.
//
//	go run ./examples/local/client --config examples/local/us-east-1.yaml 2088123456789 42 ...
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cellmesh/cellmesh/proxy"
	"github.com/cellmesh/cellmesh/routing"
)

func main() {
	os.Exit(run())
}

func run() int {
	config := flag.String("config", "examples/local/us-east-1.yaml", "config of the sidecar to send through")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for every sidecar to be ready")
	flag.Parse()
	uids := flag.Args()
	if len(uids) == 0 {
		uids = []string{"2088123456789", "2088000000012", "2088000000031", "2088000000057", "2088000000075", "7", "123456"}
	}
	st, err := proxy.LoadStatic(*config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		return 1
	}
	if err := waitReady(st, *wait); err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		return 1
	}
	transport := map[string]string{}
	for _, e := range st.Endpoints {
		transport[e.Unit] = map[proxy.Transport]string{proxy.QUIC: "HTTP/3 over QUIC", proxy.H2: "HTTP/2 over TLS"}[e.Transport]
	}
	// A request for the sidecar's own unit and service goes straight to its app.
	transport[st.Config.Identity.Unit] = "(its own app, no hop)"
	c := &http.Client{Timeout: 10 * time.Second}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "uid\tshard\thome unit\tanswered by\tregion\tfrom %s (%s) over\n", st.Config.Identity.Unit, st.Config.Identity.Region)
	bad := 0
	for _, uid := range uids {
		d, err := st.Map.Decide(&routing.Request{Method: "GET", Path: "/", Header: map[string][]string{"X-Cellmesh-Uid": {uid}}})
		if err != nil {
			fmt.Fprintf(os.Stderr, "client: uid %s: %v\n", uid, err)
			return 1
		}
		unit, region, err := send(c, st.Config.Outbound, uid)
		if err != nil {
			fmt.Fprintf(os.Stderr, "client: uid %s: %v\n", uid, err)
			bad++
			continue
		}
		mark := ""
		if unit != d.Unit {
			mark = "  <- WRONG UNIT"
			bad++
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s%s\n", uid, d.Shard, d.Unit, unit, region, transport[unit], mark)
	}
	tw.Flush()
	if bad > 0 {
		fmt.Fprintf(os.Stderr, "client: %d of %d requests did not reach the user's home unit\n", bad, len(uids))
		return 1
	}
	fmt.Printf("\nall %d users answered by their home unit\n", len(uids))
	return 0
}

// send asks the echo service, through the sidecar's outbound listener,
// for a user; the echo says which unit and region it runs in.
func send(c *http.Client, outbound, uid string) (unit, region string, err error) {
	req, err := http.NewRequest("GET", "http://"+outbound+"/v1/users/"+uid+"/profile", nil)
	if err != nil {
		return "", "", err
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	resp, err := c.Do(req)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", "", fmt.Errorf("status %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	var e struct{ Unit, Region string }
	if err := json.Unmarshal(body, &e); err != nil {
		return "", "", fmt.Errorf("answer is not the echo's JSON: %v", err)
	}
	return e.Unit, e.Region, nil
}

// waitReady polls the /readyz of the sidecar and of every unit whose
// config sits beside its file (the example's naming: <unit>.yaml).
func waitReady(st *proxy.Static, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	admins := []string{st.Config.Admin}
	dir := filepath.Dir(st.Path)
	for _, e := range st.Endpoints {
		if e.Unit == st.Config.Identity.Unit {
			continue
		}
		if peer, err := proxy.LoadStatic(filepath.Join(dir, e.Unit+".yaml")); err == nil {
			admins = append(admins, peer.Config.Admin)
		}
	}
	for _, a := range admins {
		for {
			req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+a+"/readyz", nil)
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("sidecar with admin port %s not ready after %s (see its log)", a, d)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}
