// Package wrr is the weighted round robin schedule shared by rollcall's
// gRPC balancers (package grpcresolver) and its protocol-independent Picker
// (package selector).
//
// The schedule is the static stride scheduler of grpc-go's
// weighted_round_robin policy and grpc-c++'s static_stride_scheduler: a
// shared sequence number walks the endpoints in order, and each endpoint
// takes its turn in a generation in proportion to its weight, so each
// endpoint's picks are spread evenly over time (smooth: weights 1:3 give
// B B A B B B A B ..., never A's picks in a burst) and over any long run
// the ratio of picks is the ratio of weights. A pick is lock-free and
// allocation-free: an atomic add and, on average, n*max/sum iterations of
// integer arithmetic (1 for equal weights, 1.5 for 1:3).
package wrr

import (
	"math"
	"sync/atomic"
)

// maxScaled is the largest scaled weight; weights are scaled so that the
// largest is maxScaled.
const maxScaled = math.MaxUint16

// Schedule picks indexes into a list of weighted endpoints. It is immutable
// and safe for concurrent use.
type Schedule struct {
	weights []uint16 // scaled; nil when all weights are equal (plain round robin)
	n       uint64
}

// New returns the schedule of weights (one per endpoint; a weight below 1
// counts as 1). len(weights) must be at least 1.
func New(weights []int) *Schedule {
	s := &Schedule{n: uint64(len(weights))}
	maxW := 1
	equal := true
	for _, w := range weights {
		w = max(w, 1)
		maxW = max(maxW, w)
		if w != max(weights[0], 1) {
			equal = false
		}
	}
	if equal {
		return s
	}
	s.weights = make([]uint16, len(weights))
	for i, w := range weights {
		sw := math.Round(float64(max(w, 1)) * maxScaled / float64(maxW))
		s.weights[i] = uint16(max(sw, 1))
	}
	return s
}

// Len returns the number of endpoints.
func (s *Schedule) Len() int { return int(s.n) }

// Next returns the index of the next endpoint, advancing seq, which the
// caller shares between the picks that should follow one sequence (and may
// keep across schedules, so that a new schedule goes on where the old one
// was).
func (s *Schedule) Next(seq *atomic.Uint64) int {
	if s.weights == nil {
		return int((seq.Add(1) - 1) % s.n)
	}
	const offset = maxScaled / 2
	for {
		i := seq.Add(1) - 1
		idx := i % s.n
		gen := i / s.n
		w := uint64(s.weights[idx])
		// idx takes its turn in w of every maxScaled generations; the
		// multiplication spreads its turns evenly, and the offset keeps
		// neighbours of equal weight from skipping the same generations.
		if (w*gen+idx*offset)%maxScaled >= maxScaled-w {
			return int(idx)
		}
	}
}
