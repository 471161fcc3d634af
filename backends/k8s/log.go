package k8s

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"

	"k8s.io/klog/v2"
)

// klog, which client-go logs through, is process-global: it is routed once
// to a handler that forwards to the Logger of the most recently created
// Registry.
var (
	klogOnce   sync.Once
	klogTarget atomic.Pointer[slog.Logger]
)

func routeKlog(l *slog.Logger) {
	klogTarget.Store(l.With("component", "client-go"))
	klogOnce.Do(func() { klog.SetSlogLogger(slog.New(&forwardHandler{})) })
}

// forwardHandler is a slog.Handler that hands each record to klogTarget,
// applying the attributes and groups it was derived with.
type forwardHandler struct {
	ops []func(slog.Handler) slog.Handler
}

func (h *forwardHandler) target() slog.Handler {
	l := klogTarget.Load()
	if l == nil {
		l = slog.Default()
	}
	t := l.Handler()
	for _, op := range h.ops {
		t = op(t)
	}
	return t
}

func (h *forwardHandler) Enabled(ctx context.Context, lvl slog.Level) bool {
	return h.target().Enabled(ctx, lvl)
}

func (h *forwardHandler) Handle(ctx context.Context, r slog.Record) error {
	return h.target().Handle(ctx, r)
}

func (h *forwardHandler) with(op func(slog.Handler) slog.Handler) *forwardHandler {
	ops := append(h.ops[:len(h.ops):len(h.ops)], op)
	return &forwardHandler{ops: ops}
}

func (h *forwardHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return h.with(func(t slog.Handler) slog.Handler { return t.WithAttrs(as) })
}

func (h *forwardHandler) WithGroup(name string) slog.Handler {
	return h.with(func(t slog.Handler) slog.Handler { return t.WithGroup(name) })
}
