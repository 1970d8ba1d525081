package ledger

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves the ledger's API, the handoff contract and /metrics.
//
//	GET  /accounts/{user}                         {"user","balance"}
//	POST /accounts/{user}/deposit   {"amount"}    {"ok","balance"}
//	POST /accounts/{user}/transfer  {"to","amount"} {"ok","balance"} (the sender's), or "insufficient funds"
//	POST /accounts/{user}/credit    {"amount"}    a transfer's second half (from another ledger)
//	GET  /.well-known/cellmesh/replication        the contract's watermarks
//	POST /.well-known/cellmesh/promote?shard=&epoch=, .../demote?shard=&epoch=
//	POST /.well-known/cellmesh/replicate          from the shard's primary (through the mesh)
//
// Requests for an account come through the sidecar, which sets
// x-cellmesh-shard and x-cellmesh-epoch; writes take an Idempotency-Key.
func (l *Ledger) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /accounts/{user}", l.getBalance)
	mux.HandleFunc("POST /accounts/{user}/{op}", l.postOp)
	mux.HandleFunc("GET /.well-known/cellmesh/replication", l.getReplication)
	mux.HandleFunc("POST /.well-known/cellmesh/promote", l.postRole(RolePrimary))
	mux.HandleFunc("POST /.well-known/cellmesh/demote", l.postRole(RoleStandby))
	mux.HandleFunc("POST /.well-known/cellmesh/replicate", l.postReplicate)
	mux.HandleFunc("POST /debug/apply-delay", l.postApplyDelay)
	mux.Handle("GET /metrics", promhttp.HandlerFor(l.cfg.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]string{"status": "ok"}) })
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, args...)})
}

// failErr answers an error by its kind: a stale epoch is 409, a write no
// standby took is 503 (not acknowledged: retry with the same key).
func failErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, errStaleEpoch):
		fail(w, http.StatusConflict, "%v", err)
	case errors.Is(err, errKeyReused):
		fail(w, http.StatusUnprocessableEntity, "%v: use a new Idempotency-Key for a new operation", err)
	case errors.Is(err, errNotReplicated):
		w.Header().Set("Retry-After", "1")
		fail(w, http.StatusServiceUnavailable, "%v: not acknowledged (it may still be applied with a later write); retry with the same Idempotency-Key", err)
	default:
		fail(w, http.StatusInternalServerError, "%v", err)
	}
}

// routed reads the sidecar's routing headers and checks the user is the
// request's key.
func routed(w http.ResponseWriter, r *http.Request) (shard int, epoch uint64, user string, ok bool) {
	user = r.PathValue("user")
	if uid := r.Header.Get("x-cellmesh-uid"); uid != user {
		fail(w, http.StatusBadRequest, "x-cellmesh-uid %q is not the account %q of the path: the mesh routes by it", uid, user)
		return 0, 0, "", false
	}
	s, err1 := strconv.Atoi(r.Header.Get("x-cellmesh-shard"))
	e, err2 := strconv.ParseUint(r.Header.Get("x-cellmesh-epoch"), 10, 64)
	if err1 != nil || err2 != nil || s < 0 {
		fail(w, http.StatusBadRequest, "no x-cellmesh-shard and x-cellmesh-epoch: account requests come through the sidecar")
		return 0, 0, "", false
	}
	return s, e, user, true
}

func (l *Ledger) getBalance(w http.ResponseWriter, r *http.Request) {
	shard, epoch, user, ok := routed(w, r)
	if !ok {
		return
	}
	bal, err := l.balance(shard, epoch, user)
	if err != nil {
		failErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"user": user, "balance": bal, "shard": shard, "epoch": epoch, "unit": l.cfg.Unit})
}

type opBody struct {
	Amount int64  `json:"amount"`
	To     string `json:"to,omitempty"`
}

func (l *Ledger) postOp(w http.ResponseWriter, r *http.Request) {
	shard, epoch, user, ok := routed(w, r)
	if !ok {
		return
	}
	kind := r.PathValue("op")
	var body opBody
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		fail(w, http.StatusBadRequest, "body: %v (want {\"amount\":N} or {\"to\":\"user\",\"amount\":N})", err)
		return
	}
	key := r.Header.Get("Idempotency-Key")
	switch {
	case key == "":
		fail(w, http.StatusBadRequest, "a write needs an Idempotency-Key header (unique per operation; reuse it to retry)")
		return
	case body.Amount <= 0:
		fail(w, http.StatusBadRequest, "amount %d: want a positive whole number", body.Amount)
		return
	case kind == "transfer" && (body.To == "" || body.To == user):
		fail(w, http.StatusBadRequest, "a transfer needs a receiver other than the sender")
		return
	case kind != "deposit" && kind != "credit" && kind != "transfer":
		fail(w, http.StatusNotFound, "no operation %q: deposit, transfer", kind)
		return
	}
	start := time.Now()
	defer func() { l.m.writeSeconds.WithLabelValues(kind).Observe(time.Since(start).Seconds()) }()
	if kind != "transfer" {
		res, err := l.write(r.Context(), shard, epoch, Op{ID: user + "|" + key, Kind: kind, User: user, Amount: body.Amount})
		if err != nil {
			failErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
		return
	}
	// A transfer: the debit here, then the credit at the receiver's home
	// unit through the mesh, both under keys derived from the transfer's,
	// so a retry of the transfer completes it without applying either
	// half twice.
	res, err := l.write(r.Context(), shard, epoch, Op{ID: user + "|" + key + "/debit", Kind: "debit", User: user, Amount: body.Amount, To: body.To})
	if err != nil {
		failErr(w, err)
		return
	}
	if !res.OK {
		writeJSON(w, http.StatusOK, res)
		return
	}
	if err := l.credit(r.Context(), body.To, body.Amount, user+"/"+key+"/credit"); err != nil {
		w.Header().Set("Retry-After", "1")
		fail(w, http.StatusBadGateway, "debited %s, but the credit to %s is not confirmed: %v; retry with the same Idempotency-Key to complete it", user, body.To, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// credit sends a transfer's second half to the receiver's home through
// the mesh, retrying answers that say to (a shard moving, a map behind)
// for a few seconds.
func (l *Ledger) credit(ctx context.Context, to string, amount int64, key string) error {
	body, _ := json.Marshal(opBody{Amount: amount})
	deadline := time.Now().Add(5 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		req, err := http.NewRequestWithContext(ctx, "POST", "http://"+l.cfg.Mesh+"/accounts/"+to+"/credit", bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Host = l.cfg.Service
		req.Header.Set("x-cellmesh-uid", to)
		req.Header.Set("Idempotency-Key", key)
		resp, err := l.client.Do(req)
		if err == nil {
			raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(raw)))
			if resp.StatusCode < 500 && resp.StatusCode != http.StatusConflict && resp.StatusCode != http.StatusMisdirectedRequest {
				return last
			}
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return last
}

func (l *Ledger) getReplication(w http.ResponseWriter, _ *http.Request) {
	rep, err := l.report()
	if err != nil {
		failErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

func (l *Ledger) postRole(role string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		shard, err1 := strconv.Atoi(r.URL.Query().Get("shard"))
		epoch, err2 := strconv.ParseUint(r.URL.Query().Get("epoch"), 10, 64)
		if err1 != nil || err2 != nil || epoch == 0 || shard < -1 {
			fail(w, http.StatusBadRequest, "want ?shard=N&epoch=E (E at least 1)")
			return
		}
		m, err := l.become(shard, role, epoch)
		if err != nil {
			failErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, ShardReport{Shard: shard, Role: m.Role, Epoch: m.Epoch, Committed: m.Committed, Received: m.Received, Applied: m.Applied, Sync: m.sync()})
	}
}

func (l *Ledger) postReplicate(w http.ResponseWriter, r *http.Request) {
	var req replicateRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<20)).Decode(&req); err != nil {
		fail(w, http.StatusBadRequest, "replication body: %v", err)
		return
	}
	ans, code, err := l.receive(req)
	if err != nil {
		failErr(w, err)
		return
	}
	writeJSON(w, code, ans)
}

// postApplyDelay sets the standby apply delay (?delay=500ms; 0 turns it
// off): drills and tests make a standby lag with it.
func (l *Ledger) postApplyDelay(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("x-cellmesh-origin-unit") != "" {
		fail(w, http.StatusForbidden, "fault injection is for the local operator, not for calls through the mesh")
		return
	}
	d, err := time.ParseDuration(r.URL.Query().Get("delay"))
	if err != nil || d < 0 {
		fail(w, http.StatusBadRequest, "want ?delay=DURATION (such as 500ms; 0 for none)")
		return
	}
	l.applyLag.Store(int64(d))
	if d == 0 {
		shards, _ := l.st.shards()
		for s, m := range shards {
			if m.Applied < m.Received {
				l.startApplier(s)
			}
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"apply_delay": d.String()})
}
