//go:build cuda

package server

const noCUDA = false
